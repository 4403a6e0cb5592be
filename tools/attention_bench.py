"""SAM 3's attention shapes at one resolution through each of PyTorch's fused SDPA backends (CUDA,
bf16): median milliseconds per call and TFLOP/s, to see which kernel suits which shape.

Shapes per frame at grid g = R / 14: the ViT's window layers (24 x 24 windows, 16 heads of 64),
its global layers (g*g tokens), and the DETR encoder's self-attention (8 heads of 32, one row
per class).

    python tools/attention_bench.py --resolution 1008 --classes 4 --out docs/bench/attention_1008
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any


def shapes(resolution: int, classes: int) -> dict[str, tuple[int, int, int, int]]:
    """(batch, heads, tokens, head dim) of one frame's attention calls."""
    grid = resolution // 14
    per_side = -(-grid // 24)  # windows per side, the last one padded
    windows = per_side * per_side
    return {
        "vit_window": (windows, 16, 24 * 24, 64),
        "vit_global": (1, 16, grid * grid, 64),
        "detr_encoder": (classes, 8, grid * grid, 32),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", type=int, default=1008)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/attention"))
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sam3stream.runtime.cuda_timing import median_cuda_ms

    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    rows: list[dict[str, Any]] = []
    for name, (batch, heads, tokens, dim) in shapes(args.resolution, args.classes).items():
        q, k, v = (
            torch.randn(batch, heads, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)
        )
        flop = 4 * batch * heads * tokens * tokens * dim
        row: dict[str, Any] = {"shape": name, "batch_heads_tokens_dim": [batch, heads, tokens, dim]}
        reference = None
        for label, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v)  # also the warm-up call
                    ms = median_cuda_ms(
                        partial(F.scaled_dot_product_attention, q, k, v), args.iters, warmup=0
                    )
            except RuntimeError as exc:
                row[label] = {"error": str(exc).splitlines()[0][:120]}
                continue
            reference = out if reference is None else reference
            row[label] = {
                "ms": ms,
                "tflops": flop / ms / 1e9,
                "max_abs_diff_vs_first": float((out - reference).abs().max()),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "command": "python tools/attention_bench.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
