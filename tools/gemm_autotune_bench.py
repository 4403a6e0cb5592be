"""The ViT's linear layers alone on CUDA (bf16, with bias): cuBLAS as eager PyTorch calls it, as
torch.compile's default mode calls it, and whatever torch.compile's max-autotune picks (its Triton
GEMM templates or cuBLAS, timed in isolation while compiling). Each form's best median over
alternating rounds of CUDA-event-timed calls (each 20 layers back to back, so that a compiled
form's host work per call does not idle the GPU), so clocks still rising favour none.

    python tools/gemm_autotune_bench.py --out docs/bench/gemm_autotune
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

# (name, input features, output features) of the ViT's linear layers (SAM 3, hidden 1024).
LAYERS = [("qkv", 1024, 3072), ("proj", 1024, 1024), ("fc1", 1024, 4736), ("fc2", 4736, 1024)]


LOOP = 20


def _loop(fn: Any, *args: Any) -> None:
    for _ in range(LOOP):
        fn(*args)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=5184, help="tokens per vision step (1008: 5184)")
    parser.add_argument("--layers", nargs="+", default=[name for name, _, _ in LAYERS])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/gemm_autotune"))
    args = parser.parse_args()
    from sam3stream.runtime.cuda_timing import best_alternating_ms, require_cuda, write_report

    require_cuda("tools/gemm_autotune_bench.py")

    import torch
    import torch.nn.functional as F

    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    with torch.no_grad():
        for name, fan_in, fan_out in (layer for layer in LAYERS if layer[0] in args.layers):
            x = torch.randn(args.tokens, fan_in, device=dev, dtype=dt)
            w = torch.randn(fan_out, fan_in, device=dev, dtype=dt) / fan_in**0.5
            b = torch.randn(fan_out, device=dev, dtype=dt)

            def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return F.linear(x, w, b)

            forms: dict[str, Any] = {
                "eager": linear,
                "compiled": torch.compile(linear, dynamic=False),
                "autotuned": torch.compile(linear, dynamic=False, mode="max-autotune-no-cudagraphs"),
            }
            compile_s = {}
            for form, fn in forms.items():
                t0 = time.perf_counter()
                fn(x, w, b)
                torch.cuda.synchronize()
                compile_s[form] = time.perf_counter() - t0
            reference = forms["eager"](x, w, b).float()
            # Each timed call runs the layer LOOP times back to back: the host queues ahead, so the
            # compiled forms' per-call host work (guards, wrapper) does not idle the GPU.
            calls = [partial(_loop, fn, x, w, b) for fn in forms.values()]
            times = [ms / LOOP for ms in best_alternating_ms(calls, args.rounds, args.repeats)]
            flop = 2 * args.tokens * fan_in * fan_out
            row: dict[str, Any] = {"layer": name, "shape": [args.tokens, fan_in, fan_out]}
            for form, ms in zip(forms, times, strict=True):
                row[f"{form}_ms"] = ms
                row[f"{form}_tflops"] = flop / ms / 1e9
            row["autotune_compile_s"] = compile_s["autotuned"]
            tuned = forms["autotuned"](x, w, b).float()
            row["autotuned_max_abs_diff"] = float((tuned - reference).abs().max())
            row["autotuned_speedup"] = row["compiled_ms"] / row["autotuned_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = write_report(args.out, "tools/gemm_autotune_bench.py", rows)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
