"""The whole pipeline (PyAV decode, batcher, GPU worker, JSONL sink) against the bare GPU worker.

Writes synthetic 1080p clips, builds one backend and warms it up as a Pipeline does at start
(both timed), measures the bare worker's throughput on pre-decoded frames (next batch
submitted before the previous is collected), then runs the same backend inside a Pipeline on
N file cameras and measures frames/s from the first result to the last. Prints and writes JSON
with both and their ratio.

Random weights keep no detection at the usual threshold, so the pipeline's first run has no
masks to postprocess. ``--detections D ...`` adds runs with the threshold set to the score that
the clips' first frames reach about D times per frame, so that each frame carries about D masks
to resize and encode, as a real model's would: one run per ``--post-threads`` value (default:
the pipeline's own count), for each ``--masks-on`` value
(``device``: the backend resizes and encodes them, the default; ``host``: ``[postprocess]
device_masks = false``, numpy on the postprocessing threads; then also one run per
``--post-processes`` value).

    python tools/pipeline_bench.py --random full --resolution 1008 --cameras 8 --out docs/bench/pipeline
    python tools/pipeline_bench.py --random full --resolution 560 --detections 2 4 --post-threads 1 4 \
        --post-processes 4 8 --masks-on device host --out docs/bench/pipeline_560
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_clips(folder: Path, count: int, seconds: float) -> list[Path]:
    from sam3stream.demo.clips import ClipSpec, write_clip

    photos = ["astronaut", "coffee", "chelsea", "rocket"]
    paths = []
    for i in range(count):
        spec = ClipSpec(
            f"hd{i}", photos[i % len(photos)], seed=i + 1, width=1920, height=1080, seconds=seconds
        )
        path = folder / f"hd{i}.mp4"
        if not path.exists():
            write_clip(spec, path)
        paths.append(path)
    return paths


def first_frames(clips: list[Path], cameras: int, resolution: int) -> np.ndarray:
    """Each camera's first frame, squashed to the model's square as the decode threads do."""
    import av

    frames = []
    for i in range(cameras):
        with av.open(str(clips[i % len(clips)])) as container:
            frame = next(container.decode(video=0))
            frames.append(frame.to_ndarray(width=resolution, height=resolution, format="rgb24"))
    return np.stack(frames)


def bare_throughput(backend: Any, text: Any, frames: np.ndarray, iters: int) -> float:
    """Frames/s of the backend alone, each batch submitted before the previous one is collected
    (as the GPU worker runs it; the same loop as `sam3stream bench`)."""
    from sam3stream.bench_child import MIN_SCORE, submit_ahead_ms

    for _ in range(3):
        backend.infer(frames, text, MIN_SCORE)
    intervals = submit_ahead_ms(backend, frames, text, iters)
    return len(intervals) * frames.shape[0] / (sum(intervals) / 1e3)


def memory_mib(device: str) -> dict[str, float | None]:
    """The process's GPU memory now (NVML, context included) and the allocator's peaks so far."""
    from sam3stream.bench_child import MIB, nvml_process_mib

    if not device.startswith("cuda"):
        return {"nvml_mib": None, "alloc_peak_mib": None, "reserved_peak_mib": None}
    import torch

    return {
        "nvml_mib": nvml_process_mib(),
        "alloc_peak_mib": torch.cuda.max_memory_allocated() / MIB,
        "reserved_peak_mib": torch.cuda.max_memory_reserved() / MIB,
    }


def config_text(
    clips: list[Path],
    cameras: int,
    classes: list[str],
    out: Path,
    batch: int,
    res: int,
    conf: float = 0.3,
    device_masks: bool = True,
    batch_queue: int = 1,
    random: str = "full",
    device: str = "cuda",
) -> str:
    cams = "\n".join(
        f'[[cameras]]\nname = "cam{i}"\nurl = "{clips[i % len(clips)]}"\nmode = "file"\n'
        for i in range(cameras)
    )
    return f"""
[engines]
dir = "{out / "unused-engines"}"
backend = "torch"
device = "{device}"

[engines.export]
random = "{random}"
resolution = {res}

[prompts]
classes = {json.dumps(classes)}
conf = {conf!r}

[batching]
max_batch = {batch}
max_wait_ms = 20
batch_queue = {batch_queue}

[postprocess]
device_masks = {str(device_masks).lower()}

{cams}
[[sinks]]
type = "jsonl"
path = "{out / "jsonl"}"
"""


async def run_pipeline(
    config: Any, backend: Any, post_threads: int | None, post_processes: int = 0
) -> tuple[int, float, int]:
    """Results delivered, their frames/s and the detections they carried."""
    from sam3stream.stream.pipeline import Pipeline

    count, detections, first, last = 0, 0, 0.0, 0.0
    async with Pipeline(
        config,
        backend=backend,
        results_queue=4096,
        post_threads=post_threads,
        post_processes=post_processes,
    ) as pipe:

        async def consume() -> None:
            nonlocal count, detections, first, last
            async for result in pipe.results():
                now = time.perf_counter()
                if count == 0:
                    first = now
                count, last = count + 1, now
                detections += len(result.detections)

        reader = asyncio.create_task(consume())
        await pipe.wait()
        await asyncio.sleep(0.2)
        reader.cancel()
    # The first result marks the start: engine load and the first graph captures are not counted.
    return count, (count - 1) / (last - first) if count > 1 and last > first else 0.0, detections


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--random", default="full", choices=["tiny", "full"])
    parser.add_argument("--resolution", type=int, default=1008)
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each synthetic clip")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--overlap", action=argparse.BooleanOptionalAction, default=True, help="TorchOptions(overlap=...)"
    )
    parser.add_argument(
        "--detections",
        type=float,
        nargs="+",
        default=None,
        metavar="D",
        help="after the run at conf 0.3, one more run per D with the threshold that keeps about D "
        "detections per frame",
    )
    parser.add_argument(
        "--post-threads",
        type=int,
        nargs="+",
        default=[None],
        help="Pipeline(post_threads=...) for the runs with detections, one run each; default: its own",
    )
    parser.add_argument(
        "--post-processes",
        type=int,
        nargs="+",
        default=[],
        help="also one run per --detections value with Pipeline(post_processes=N) for each N",
    )
    parser.add_argument(
        "--masks-on",
        nargs="+",
        choices=["device", "host"],
        default=["device"],
        help="where the runs with detections resize and encode masks ([postprocess] device_masks)",
    )
    parser.add_argument(
        "--batch-queue",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="[batching] batch_queue: the run at the usual threshold once per N (the runs with "
        "detections take the first)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench/pipeline"))
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        from sam3stream.runtime.cuda_timing import require_cuda

        require_cuda("tools/pipeline_bench.py", instead="pass --device cpu")
    for d in args.detections or []:
        if d <= 0:
            parser.error(f"--detections must be > 0, got {d}")
    for n in args.post_threads:
        if n is not None and n < 1:
            parser.error(f"--post-threads must be >= 1, got {n}")
    for n in args.post_processes:
        if n < 1:
            parser.error(f"--post-processes must be >= 1, got {n}")
    for n in args.batch_queue:
        if n < 1:
            parser.error(f"--batch-queue must be >= 1, got {n}")

    from sam3stream.bench import BENCH_PROMPTS, BenchArgs
    from sam3stream.bench_child import random_torch_backend, threshold_keeping
    from sam3stream.config import parse_config
    from sam3stream.runtime.torch_backend import TorchOptions
    from sam3stream.stream.worker import post_threads_or_default

    work = Path(tempfile.mkdtemp(prefix="sam3-pipeline-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the clips and the runs' JSONL
    t = time.perf_counter()
    clips = make_clips(work, min(args.cameras, 4), args.seconds)
    _say(f"clips written in {time.perf_counter() - t:.0f} s: {len(clips)} x 1920x1080, {args.seconds} s each")
    bargs = BenchArgs(
        resolutions=[args.resolution], cameras=[args.cameras], random=args.random, device=args.device
    )
    t = time.perf_counter()
    backend = random_torch_backend(bargs, args.resolution, args.cameras, TorchOptions(overlap=args.overlap))
    load_s = time.perf_counter() - t
    classes = BENCH_PROMPTS[: args.classes]
    text = backend.encode_text(classes)
    # What a Pipeline does before its cameras start: compile and capture every batch slot.
    _say(f"backend built in {load_s:.0f} s; warming up")
    t = time.perf_counter()
    backend.warm_up(text)
    warm_up_s = time.perf_counter() - t
    _say(f"warmed up in {warm_up_s:.0f} s")
    frames = np.random.default_rng(0).integers(
        0, 256, (args.cameras, args.resolution, args.resolution, 3), dtype=np.uint8
    )
    bare = bare_throughput(backend, text, frames, args.iters)
    bare_memory = memory_mib(args.device)
    _say(f"bare GPU worker: {bare:.1f} frames/s, memory {bare_memory}")
    # The first run keeps the usual threshold (random weights: no detection passes it); each
    # --detections value then runs again with about that many masks per frame to postprocess,
    # per --masks-on value once per --post-threads value (and, masks on the host, once per
    # --post-processes value). The threshold comes from the clips' own first frames: the scores
    # of random weights depend on the picture.
    queue = args.batch_queue[0]
    runs_for: list[tuple[float | None, int | None, int, str, int]] = [
        (None, None, 0, "device", q) for q in args.batch_queue
    ]
    for d in args.detections or []:
        for where in args.masks_on:
            runs_for += [(d, n, 0, where, queue) for n in args.post_threads]
            if where == "host":  # frames whose masks the device encoded never go to processes
                runs_for += [(d, None, n, where, queue) for n in args.post_processes]
    # Threshold 1 still returns every score, and gathers no mask.
    scores = (
        backend.infer(first_frames(clips, args.cameras, args.resolution), text, 1.0).scores
        if args.detections
        else None
    )
    runs = []
    for target, threads, processes, where, batch_queue in runs_for:
        conf = 0.3 if target is None or scores is None else threshold_keeping(scores, target)
        toml = config_text(
            clips,
            args.cameras,
            classes,
            work / f"run{len(runs)}",
            args.cameras,
            args.resolution,
            conf,
            device_masks=where == "device",
            batch_queue=batch_queue,
            random=args.random,
            device=args.device,
        )
        config = parse_config(toml, source="pipeline-bench.toml", base_dir=work)
        count, pipeline_fps, detections = asyncio.run(run_pipeline(config, backend, threads, processes))
        ratio = pipeline_fps / bare if bare else 0.0
        per_frame = detections / count if count else 0.0
        workers = f"{processes} processes" if processes else f"{post_threads_or_default(threads)} threads"
        _say(
            f"pipeline, threshold {conf:.6g} ({per_frame:.2f} detections per frame, masks on the {where}, "
            f"postprocessing on {workers}, batch_queue {batch_queue}): {count} results, "
            f"{pipeline_fps:.1f} frames/s = {ratio:.1%} of the bare worker"
        )
        runs.append(
            {
                "target_detections": target,
                "post_threads": 0 if processes else post_threads_or_default(threads),
                "post_processes": processes,
                "masks_on": where,
                "batch_queue": batch_queue,
                "conf": conf,
                "results": count,
                "detections_per_frame": per_frame,
                "pipeline_fps": pipeline_fps,
                "ratio": ratio,
            }
        )
    # Measured after the pipeline ran in the same process: its threads, decode and sinks add to
    # what the bare worker held (a deployment's figure, not the bench's).
    pipeline_memory = memory_mib(args.device)
    _say(f"memory after the pipeline: {pipeline_memory}")
    result = {
        "command": "python tools/pipeline_bench.py " + " ".join(sys.argv[1:]),
        "resolution": args.resolution,
        "cameras": args.cameras,
        "classes": args.classes,
        "clip": "1920x1080 H.264, 25 fps",
        "frames_per_camera": round(25 * args.seconds),
        "results": runs[0]["results"],
        "load_s": load_s,
        "warm_up_s": warm_up_s,
        "bare_fps": bare,
        "pipeline_fps": runs[0]["pipeline_fps"],
        "ratio": runs[0]["ratio"],
        "runs": runs,
        "memory_after_bare": bare_memory,
        "memory_after_pipeline": pipeline_memory,
        "cpu_count": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
