"""The ViT MLP alone on CUDA: fc1 + exact GELU + fc2 as torch.compile builds it (cuBLAS GEMMs and a
Triton GELU kernel) against fc1 with the GELU in cuBLASLt's epilogue (runtime/vit_rewrite.py).
Median milliseconds over CUDA-event-timed calls, for the tokens of one vision step.

    python tools/vit_mlp_bench.py --tokens 5184 10368 --out docs/bench/vit_mlp
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[5184])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4736)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/vit_mlp"))
    args = parser.parse_args()
    from sam3stream.runtime.cuda_timing import median_cuda_ms, require_cuda, write_report

    require_cuda("tools/vit_mlp_bench.py")

    import torch
    import torch.nn.functional as F

    from sam3stream.runtime.fused_mlp import linear_gelu

    dev, dt = torch.device("cuda"), torch.bfloat16
    fc1 = torch.nn.Linear(args.dim, args.hidden, device=dev, dtype=dt)
    fc2 = torch.nn.Linear(args.hidden, args.dim, device=dev, dtype=dt)

    def exact(x: torch.Tensor) -> torch.Tensor:
        return fc2(F.gelu(fc1(x)))

    def fused(x: torch.Tensor) -> torch.Tensor:
        return fc2(linear_gelu(x, fc1.weight, fc1.bias))

    variants = {"exact_gelu": torch.compile(exact), "fused_gelu": torch.compile(fused)}
    rows = []
    with torch.no_grad():
        for tokens in args.tokens:
            x = torch.randn(tokens, args.dim, device=dev, dtype=dt)
            row: dict[str, Any] = {"tokens": tokens}
            for name, fn in variants.items():
                row[f"{name}_ms"] = median_cuda_ms(partial(fn, x), args.iters)
            row["max_abs_diff"] = float((variants["exact_gelu"](x) - variants["fused_gelu"](x)).abs().max())
            row["speedup"] = row["exact_gelu_ms"] / row["fused_gelu_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = write_report(args.out, "tools/vit_mlp_bench.py", rows)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
