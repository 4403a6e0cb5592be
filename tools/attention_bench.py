"""SAM 3's attention shapes at one resolution through each of PyTorch's fused SDPA backends (CUDA,
bf16) and through our Triton kernel (runtime/attention_kernel.py): median milliseconds per call,
TFLOP/s, and each output's largest difference from a float32 reference.

With ``--triton`` the kernel's numeric options (fast exponentials, row sums by matmul) are timed
at the default tile first; then tile shapes, warps and pipeline stages are swept with the best
of them. The fastest configuration per shape is what ``attention_kernel._CONFIGS`` should hold.

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
    parser.add_argument("--triton", action="store_true", help="also time the Triton kernel's variants")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/attention"))
    args = parser.parse_args()
    from sam3stream.runtime.cuda_timing import median_cuda_ms, require_cuda, write_report

    require_cuda("tools/attention_bench.py")

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

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
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
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
                "max_abs_diff_vs_fp32": float((out.float() - exact).abs().max()),
            }
        if args.triton:
            row["triton"] = _sweep_triton(q, k, v, exact.transpose(1, 2), flop, args.iters)
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = write_report(args.out, "tools/attention_bench.py", rows)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _sweep_triton(q: Any, k: Any, v: Any, exact: Any, flop: int, iters: int) -> list[dict[str, Any]]:
    """Time the kernel's numeric variants, then tiles with the best of them; fastest first."""
    from dataclasses import asdict, replace

    from sam3stream.runtime.attention_kernel import KernelConfig, launch
    from sam3stream.runtime.cuda_timing import median_cuda_ms

    scale = q.shape[-1] ** -0.5

    def measure(cfg: KernelConfig) -> dict[str, Any]:
        try:
            out = launch(q, k, v, scale, cfg)  # compiles; also the warm-up
            ms = median_cuda_ms(partial(launch, q, k, v, scale, cfg), iters, warmup=1)
        except Exception as exc:  # a tile that does not fit shared memory or registers
            lines = [line for line in str(exc).splitlines() if line.strip()]
            return {**asdict(cfg), "error": " | ".join(lines[-3:])[:300]}
        result = {
            **asdict(cfg),
            "ms": ms,
            "tflops": flop / ms / 1e9,
            "max_abs_diff_vs_fp32": float((out.float() - exact).abs().max()),
        }
        print("  triton", json.dumps(result), flush=True)
        return result

    base = KernelConfig()
    numerics = [
        measure(replace(base, fast_exp=fast, sum_by_dot=by_dot))
        for fast in (False, True)
        for by_dot in (False, True)
    ]
    timed = [r for r in numerics if "ms" in r]
    if not timed:
        return numerics
    best = min(timed, key=lambda r: r["ms"])
    tiles = [
        measure(replace(base, fast_exp=best["fast_exp"], sum_by_dot=best["sum_by_dot"],
                        block_m=m, block_n=n, warps=w, stages=st))
        for m in (64, 128)
        for n in (64, 128)
        for w in (4, 8)
        for st in (2, 3, 4)
        if (m, n, w, st) != (base.block_m, base.block_n, base.warps, base.stages)
    ]  # fmt: skip
    return sorted(numerics + tiles, key=lambda r: r.get("ms", float("inf")))


if __name__ == "__main__":
    raise SystemExit(main())
