"""Host cost of one detection's mask: SAM 3's 288x288 mask logits resized to the output size,
thresholded at 0 and run-length encoded, as postprocessing does for every kept detection.
Interpolating every pixel and encoding the mask, against finding the runs from the mask's edge
cells alone (postprocess.py); both give the same runs. Median milliseconds per mask over masks
of a few round objects, and the detections per second one postprocessing thread keeps up with.
``--threads N ...`` also measures masks per second at 1920x1080 with N threads at once (as the
pipeline's postprocessing threads run), and ``--processes N ...`` with N processes (``[postprocess]
processes``), for object masks and for speckled ones like a randomly initialised model's
(mostly on, about 30% of the cells on the edge, tens of thousands of runs). ``--device cuda``
also times the device encoder (runtime/mask_encode.py, what the GPU worker uses by default with
the torch backend on CUDA): milliseconds per mask to resize, encode and bring the runs back, and
to pack them into strings on the host, for both kinds, and how many pixels of its masks differ
from the host encoder's.

    python tools/postprocess_bench.py --out docs/bench/postprocess_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt


def blob_logits(size: int, seed: int) -> npt.NDArray[np.float32]:
    """Mask logits of up to three round objects: smooth, like a mask head's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    logits = np.full((size, size), -8.0, np.float32)
    for cy, cx, r in rng.uniform([0.1, 0.1, 0.05], [0.9, 0.9, 0.3], (3, 3)):
        logits = np.maximum(logits, 20 * (r**2 - (yy - cy) ** 2 - (xx - cx) ** 2) / r**2)
    return logits.astype(np.float32)


def speckled_logits(size: int, seed: int) -> npt.NDArray[np.float32]:
    """Mostly positive logits with noise: about 9% of the values below 0, like the masks a
    randomly initialised SAM 3 gives."""
    rng = np.random.default_rng(seed)
    return (2.0 + 1.5 * rng.standard_normal((size, size))).astype(np.float32)


def encode_full_hd(logits: npt.NDArray[np.float32]) -> str:
    from sam3stream.postprocess import _mask_counts
    from sam3stream.rle import counts_to_string

    return counts_to_string(_mask_counts(logits, 1920, 1080))


def masks_per_s(masks: list[npt.NDArray[np.float32]], workers: int, repeats: int, processes: bool) -> float:
    """Masks per second, 1920x1080, ``workers`` threads (or processes, each sent its masks as
    the pipeline's are) each encoding its share of the masks."""
    import multiprocessing
    from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

    pool: Executor = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        if processes
        else ThreadPoolExecutor(workers)
    )
    work = masks * max(1, repeats * workers)
    with pool:
        list(pool.map(encode_full_hd, masks * workers))  # tables cached, workers started
        start = time.perf_counter()
        list(pool.map(encode_full_hd, work))
        return len(work) / (time.perf_counter() - start)


def device_rates(masks: list[npt.NDArray[np.float32]], device: str, repeats: int) -> dict[str, float]:
    """The device encoder on a block of masks at 1920x1080, as the backend calls it after a batch:
    median ms per mask for the device part (resize, threshold, runs back to the host) and for the
    host's string packing, and the most pixels in which one of its masks differs from the host's."""
    import torch

    from sam3stream.postprocess import _mask_counts
    from sam3stream.rle import counts_to_string, decode
    from sam3stream.runtime.mask_encode import encode_kept_masks
    from sam3stream.stream.frames import Rle

    block = torch.from_numpy(np.stack(masks)).to(device)[None, None]  # [1, 1, N, M, M]
    index = torch.tensor([[0, 0, k] for k in range(len(masks))], device=device)
    sizes = [(1920, 1080)]
    encode, pack = [], []
    for _ in range(repeats + 1):  # the first warms kernels and caches up
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        counts = encode_kept_masks(block, index, sizes)
        t1 = time.perf_counter()
        strings = [counts_to_string(c) for c in counts]
        t2 = time.perf_counter()
        encode.append((t1 - t0) * 1e3 / len(masks))
        pack.append((t2 - t1) * 1e3 / len(masks))

    def pixels(c: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        return decode(Rle(size=(1080, 1920), counts=counts_to_string(c)))

    differ = max(
        int(
            np.count_nonzero(
                pixels(_mask_counts(m, 1920, 1080)) != decode(Rle(size=(1080, 1920), counts=got))
            )
        )
        for m, got in zip(masks, strings, strict=True)
    )
    return {
        "device_ms_per_mask": float(np.median(encode[1:])),
        "pack_ms_per_mask": float(np.median(pack[1:])),
        "most_pixels_differing_from_host": differ,
    }


def mask_ms(
    form: Callable[[npt.NDArray[np.float32], int, int], npt.NDArray[np.int64]],
    masks: list[npt.NDArray[np.float32]],
    width: int,
    height: int,
    repeats: int,
) -> float:
    """Median over masks of each mask's median milliseconds: resize + threshold + RLE string."""
    from sam3stream.rle import counts_to_string

    per_mask = []
    for logits in masks:
        counts_to_string(form(logits, width, height))  # tables cached, caches warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            counts_to_string(form(logits, width, height))
            times.append((time.perf_counter() - start) * 1e3)
        per_mask.append(np.median(times))
    return float(np.median(per_mask))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["1920x1080", "1280x720", "1008x1008", "640x360"])
    parser.add_argument("--masks", type=int, default=20, help="different masks timed per size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[], help="thread counts for masks/s")
    parser.add_argument("--processes", type=int, nargs="+", default=[], help="process counts for masks/s")
    parser.add_argument("--device", default=None, help="also time the device encoder here (e.g. cuda)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/postprocess_cpu"))
    args = parser.parse_args()
    for size in args.sizes:
        if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", size):
            parser.error(f"--sizes takes WIDTHxHEIGHT, e.g. 1920x1080; got {size!r}")
    for flag, values in (("--masks", [args.masks]), ("--repeats", [args.repeats])):
        if min(values) < 1:
            parser.error(f"{flag} must be >= 1, got {min(values)}")
    for flag, values in (("--threads", args.threads), ("--processes", args.processes)):
        if values and min(values) < 1:
            parser.error(f"{flag} must be >= 1, got {min(values)}")
    if args.device is not None and args.device.startswith("cuda"):
        from sam3stream.runtime.cuda_timing import require_cuda

        require_cuda("tools/postprocess_bench.py", "leave out --device to time the host encoder alone")

    from sam3stream.postprocess import _dense_counts as every_pixel
    from sam3stream.postprocess import _mask_counts

    masks = [blob_logits(288, seed) for seed in range(args.masks)]
    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        for logits in masks:  # the two forms must agree before their times mean anything
            if not np.array_equal(_mask_counts(logits, width, height), every_pixel(logits, width, height)):
                print(f"{size}: the two forms disagree", file=sys.stderr)
                return 1

        every = mask_ms(every_pixel, masks, width, height, args.repeats)
        edge = mask_ms(_mask_counts, masks, width, height, args.repeats)
        row = {
            "size": size,
            "every_pixel_ms": every,
            "edge_only_ms": edge,
        }
        row["speedup"] = row["every_pixel_ms"] / row["edge_only_ms"]
        row["detections_per_s_one_thread"] = 1e3 / row["edge_only_ms"]
        rows.append(row)
        print(
            f"{size}: every pixel {row['every_pixel_ms']:.2f} ms, edge only {row['edge_only_ms']:.2f} ms "
            f"({row['speedup']:.1f}x), {row['detections_per_s_one_thread']:.0f} masks/s per thread"
        )
    throughput = []
    kinds = {"objects": masks, "speckled": [speckled_logits(288, seed) for seed in range(args.masks)]}
    for kind, logits_list in kinds.items():
        for how, counts in (("threads", args.threads), ("processes", args.processes)):
            for n in counts:
                rate = masks_per_s(logits_list, n, args.repeats, processes=how == "processes")
                throughput.append({"masks": kind, "size": "1920x1080", how: n, "masks_per_s": rate})
                print(f"{kind} masks, 1920x1080, {n} {how}: {rate:.0f} masks/s")
    on_device = []
    if args.device:
        for kind, logits_list in kinds.items():
            rates = device_rates(logits_list, args.device, args.repeats)
            on_device.append({"masks": kind, "size": "1920x1080", "device": args.device, **rates})
            print(
                f"{kind} masks on {args.device}: {rates['device_ms_per_mask']:.3f} ms per mask on the "
                f"device, {rates['pack_ms_per_mask']:.3f} ms packing on the host, at most "
                f"{rates['most_pixels_differing_from_host']} pixels differing from the host's"
            )
    result = {
        "command": "python tools/postprocess_bench.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "numpy": np.__version__,
        "rows": rows,
        "throughput": throughput,
        "device_encoder": on_device,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
