"""GPU memory after each step of building and running the torch backend: NVML (the process,
CUDA context included), the allocator's reserved and allocated MiB. ``--bench-steps`` adds the
steps `sam3stream bench` takes before its measurement (the matmul peak, the FLOP count).
``--warm-up`` starts with the backend's warm-up, as a Pipeline does. ``--kept D ...`` then runs
batches on a separate thread, as the GPU worker does, at the thresholds that keep about D
detections per frame (random weights keep none at the usual threshold): the masks a real model
keeps are resized to 1920x1080 and encoded on the device, as the GPU worker has them by default
(``--masks-on host``: their logits are copied back instead).

The model is built on the GPU before the backend exists, as the bench and the tools do; set
PYTORCH_CUDA_ALLOC_CONF yourself to compare allocator settings (an empty value leaves the
allocator's default; unset, the tools ask for expandable segments).

    python tools/memory_trace.py --resolution 1008 --cameras 8 --bench-steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", type=int, default=1008)
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--bench-steps", action="store_true")
    parser.add_argument(
        "--warm-up", action="store_true", help="warm the backend up first, as a Pipeline does"
    )
    parser.add_argument("--kept", type=float, nargs="+", default=[], metavar="D")
    parser.add_argument("--masks-on", choices=["device", "host"], default="device")
    parser.add_argument("--out", type=Path, default=None, help="also write the steps as JSON")
    args = parser.parse_args()
    from sam3stream.runtime.cuda_timing import require_cuda

    require_cuda("tools/memory_trace.py")

    import torch

    from sam3stream.bench import BENCH_PROMPTS, BenchArgs
    from sam3stream.bench_child import (
        MIB,
        MIN_SCORE,
        _flops_per_frame,
        matmul_tflops,
        nvml_process_mib,
        random_torch_backend,
        submit_ahead_ms,
        threshold_keeping,
    )
    from sam3stream.model.roi_align import install_into_transformers
    from sam3stream.runtime.torch_backend import TorchOptions

    install_into_transformers()
    steps: list[dict[str, Any]] = []

    def step(name: str) -> None:
        torch.cuda.synchronize()
        row = {
            "step": name,
            "nvml_mib": nvml_process_mib(),
            "reserved_mib": torch.cuda.memory_reserved() / MIB,
            "allocated_mib": torch.cuda.memory_allocated() / MIB,
            "reserved_peak_mib": torch.cuda.max_memory_reserved() / MIB,
            "allocated_peak_mib": torch.cuda.max_memory_allocated() / MIB,
        }
        steps.append(row)
        print(json.dumps(row), flush=True)

    bargs = BenchArgs(resolutions=[args.resolution], cameras=[args.cameras], random="full", device="cuda")
    # Epilogue and kernel pinned on, so that the start-up timings do not vary the result.
    options = TorchOptions(fused_gelu=True, attention_kernel=True)
    backend = random_torch_backend(bargs, args.resolution, args.cameras, options)
    step("built")
    if args.bench_steps:
        matmul_tflops(torch.device("cuda"))
        step("matmul peak")
    text = backend.encode_text(BENCH_PROMPTS[: args.classes])
    if args.warm_up:
        backend.warm_up(text)
        step("warmed up")
    if args.bench_steps:
        _flops_per_frame(backend, text)
        step("FLOP count")
    frames = np.random.default_rng(0).integers(
        0, 256, (args.cameras, args.resolution, args.resolution, 3), dtype=np.uint8
    )
    for n in range(3):
        backend.infer(frames, text, MIN_SCORE)
        step(f"batch {n + 1}")
    submit_ahead_ms(backend, frames, text, 10)
    step("10 more, submitted ahead")
    if args.kept:
        scores = backend.infer(frames, text, 1.0).scores  # every score, no mask gathered
        sizes = [(1920, 1080)] * args.cameras if args.masks_on == "device" else None
        # The worker submits and collects on its own engine thread, not the main one.
        with ThreadPoolExecutor(1) as engine:
            for per_frame in args.kept:
                conf = threshold_keeping(scores, per_frame)
                kept = engine.submit(
                    lambda c=conf: [backend.infer(frames, text, c, sizes) for _ in range(3)]
                ).result()
                masks = sum(len(r.mask_index) for r in kept) / (3 * args.cameras)
                step(f"3 batches on an engine thread, threshold {conf:.6g}: {masks:.1f} masks per frame")
            engine.submit(backend.infer, frames, text, 0.0, sizes).result()
        step("one batch keeping every detection (threshold 0)")
    if args.out:
        report = {
            "command": "python tools/memory_trace.py " + " ".join(sys.argv[1:]),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "steps": steps,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
