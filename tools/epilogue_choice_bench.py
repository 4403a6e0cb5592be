"""How the torch backend's start-up timing of an MLP's activation epilogue (runtime/fused_mlp.py)
chooses, timed the way it was (each call between two CUDA events, host dispatch included) and
the way it is (each form captured in a CUDA graph, as the backend runs them). Each trial is one
start's timing (five alternating rounds of ten calls); the row says how often each way picked
the fused form, and the median times each way saw.

    python tools/epilogue_choice_bench.py --trials 8 --out docs/bench/epilogue_choice
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

# (activation, width, hidden, tokens): the ViT MLP at one vision step of 1008 (chunk 1), 840 and
# 672 (chunk 2) and 560 (chunk 4), and the DETR encoder's ReLU MLP for 4 classes at 1008.
SHAPES = [
    ("gelu", 1024, 4736, 72 * 72),
    ("gelu", 1024, 4736, 2 * 60 * 60),
    ("gelu", 1024, 4736, 2 * 48 * 48),
    ("gelu", 1024, 4736, 4 * 40 * 40),
    ("relu", 256, 2048, 4 * 72 * 72),
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/epilogue_choice"))
    args = parser.parse_args()
    from sam3stream.runtime.cuda_timing import best_alternating_ms, cuda_graphed, require_cuda, write_report

    require_cuda("tools/epilogue_choice_bench.py")

    import torch

    from sam3stream.runtime.fused_mlp import FusedMLP

    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    with torch.no_grad():
        for activation, width, hidden, tokens in SHAPES:
            mlp = _mlp(torch, activation, width, hidden, dev, dt)
            x = torch.randn(tokens, width, device=dev, dtype=dt)
            forms = [partial(mlp, x), partial(FusedMLP(mlp, activation), x)]
            graphed = [cuda_graphed(form) for form in forms]
            row: dict[str, Any] = {"activation": activation, "shape": [tokens, width, hidden]}
            for way, timed in (("per_call", forms), ("graphed", graphed)):
                trials = [best_alternating_ms(timed, rounds=5, repeats=10) for _ in range(args.trials)]
                row[way] = {
                    "fused_picked": sum(fused < plain for plain, fused in trials),
                    "trials": len(trials),
                    "separate_ms": statistics.median(plain for plain, _ in trials),
                    "fused_ms": statistics.median(fused for _, fused in trials),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = write_report(args.out, "tools/epilogue_choice_bench.py", rows)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _mlp(torch: Any, activation: str, width: int, hidden: int, dev: Any, dt: Any) -> Any:
    """An MLP shaped like transformers' Sam3MLP (fc1, activation_fn, fc2), random weights."""

    class MLP(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(width, hidden, device=dev, dtype=dt)
            self.fc2 = torch.nn.Linear(hidden, width, device=dev, dtype=dt)
            self.activation_fn = torch.nn.GELU() if activation == "gelu" else torch.nn.ReLU()

        def forward(self, x: Any) -> Any:
            return self.fc2(self.activation_fn(self.fc1(x)))

    return MLP()


if __name__ == "__main__":
    raise SystemExit(main())
