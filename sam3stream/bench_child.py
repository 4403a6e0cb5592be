"""One resolution of `sam3stream bench`, in its own process. Rows go to stdout as JSON lines,
progress to stderr. Not a public entry point: run by :mod:`sam3stream.bench`."""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sam3stream.bench import BENCH_PROMPTS, BenchArgs, summarize_ms
from sam3stream.errors import BackendUnavailableError, Sam3StreamError
from sam3stream.gpu_memory import process_gpu_memory
from sam3stream.runtime.allocator import prefer_expandable_segments

MIN_SCORE = 0.3
MIB = 1 << 20


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _emit(row: dict[str, Any], device: str) -> None:
    """Print ``row`` for the parent, with the device it was measured on and the torch build."""
    import torch

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
    print(json.dumps({**row, "device": name, "torch": torch.__version__}), flush=True)


def nvml_process_mib() -> float | None:
    """This process's GPU memory as the driver sees it (CUDA context included), in MiB; the
    bench has the GPU to itself, so the device's used memory stands in where NVML hides pids."""
    used = process_gpu_memory(device_used_fallback=True)
    return None if used is None else used / MIB


def matmul_tflops(device: Any) -> float:
    """Dense bf16 8192^3 matmul rate: the ceiling the FLOP utilisation is measured against."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    # torch.cuda.Event is unannotated in torch.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds: float = start.elapsed_time(end) / 1e3 / 10
    del a, b
    return 2 * n**3 / seconds / 1e12


def _random_loaded(args: BenchArgs, resolution: int, device: str) -> Any:
    from sam3stream.model.build import random_model
    from sam3stream.model.checkpoint import LoadedModel
    from sam3stream.model.tokenizer_files import write_tiny_tokenizer

    assert args.random is not None
    # The model goes to the GPU before any backend exists: ask for the allocator setting the
    # torch backend would, while CUDA is still untouched (ours, the peer and the tools alike).
    prefer_expandable_segments(device)
    tok = Path(tempfile.mkdtemp(prefix="sam3bench-tok-"))
    atexit.register(shutil.rmtree, tok, ignore_errors=True)  # read when the backend is built
    write_tiny_tokenizer(tok)
    model = random_model(args.random, resolution, args.seed, device=device)
    return LoadedModel(
        model=model,
        tokenizer_dir=tok,
        checkpoint_sha256=f"random-{args.random}-{args.seed}",
        source=f"random:{args.random}:seed={args.seed}",
    )


def random_torch_backend(args: BenchArgs, resolution: int, batch: int, options: Any) -> Any:
    """A TorchBackend over random weights of ``args.random``, with what only building needed
    released: the model object, and on CUDA the allocator's cache of the float32 initialisation
    (kept, it showed as ~400 MiB more process memory in NVML than the backend holds)."""

    from sam3stream.runtime.torch_backend import TorchBackend

    loaded = _random_loaded(args, resolution, args.device)
    backend = TorchBackend.from_model(
        loaded, resolution=resolution, batch=batch, queries=args.queries, device=args.device, options=options
    )
    del loaded
    _release_build_memory(args.device)
    return backend


def _release_build_memory(device: str) -> None:
    """Give back the allocator's cache of what only building needed, and restart its peaks."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def submit_ahead_ms(backend: Any, frames: npt.NDArray[np.uint8], text: Any, iters: int) -> list[float]:
    """Milliseconds between results with each batch submitted before the previous one is collected,
    as the GPU worker runs: ``iters`` intervals."""
    intervals = []
    pending = backend.submit(frames, text, MIN_SCORE)
    last = time.perf_counter()
    for _ in range(iters):
        nxt = backend.submit(frames, text, MIN_SCORE)
        pending.result()
        now = time.perf_counter()
        intervals.append((now - last) * 1e3)
        last, pending = now, nxt
    pending.result()
    return intervals


def threshold_keeping(scores: npt.NDArray[np.float32], per_frame: float) -> float:
    """The score that about ``per_frame`` detections per frame reach, from one batch's scores
    [B, C, K] (every query of every class). Random weights keep nothing at the usual threshold;
    the tools use this to give them a real model's postprocessing load."""
    ranked = np.sort(scores.reshape(-1))[::-1]
    keep = max(1, min(ranked.size, round(per_frame * scores.shape[0])))
    return float(ranked[keep - 1])


def _flops_per_frame(backend: Any, text: Any) -> float | None:
    """FLOPs of one frame through vision, geometry and the decoder (all classes), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        r = backend.manifest.resolution
        frames = torch.zeros(1, r, r, 3, dtype=torch.uint8, device=backend.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fpn0, fpn1, fpn2 = backend._vision(frames)
            geo, geo_mask = backend._geometry(fpn2, backend._boxes[:1], backend._box_labels[:1])
            tf = torch.from_numpy(text.features).to(backend.device, backend.dtype)
            tm = torch.from_numpy(text.mask).to(backend.device)
            backend._decoder(fpn0, fpn1, fpn2, tf, tm, geo, geo_mask)
        return float(counter.get_total_flops())
    except Exception as exc:  # counting is informative only
        _say(f"    flop counting failed: {exc}")
        return None


def run_ours(args: BenchArgs, resolution: int) -> None:
    import torch

    from sam3stream.model.roi_align import install_into_transformers
    from sam3stream.runtime.torch_backend import TorchOptions

    install_into_transformers()
    device = args.device
    # The service's max_batch, and the frames its batches hold when fewer cameras than that:
    # this child's camera counts share one vision chunk (bench.camera_groups).
    batch = args.engine_batch or max(args.cameras)
    typical = max(args.cameras)
    t0 = time.perf_counter()
    if args.engines:
        from sam3stream.runtime.loader import open_backend

        backend: Any = open_backend(
            args.backend, Path(args.engines), device, typical_batch=typical, compile_cache=True
        )
        _release_build_memory(device)
    else:
        options = TorchOptions(
            precision=args.precision,
            compile_mode=args.compile_mode,
            compile_cache=args.compile_cache,
            vision_chunk=args.vision_chunk,
            typical_batch=typical,
            decoder_frames=args.decoder_frames,
            query_precision=args.query_precision,
            overlap=args.overlap,
            fused_gelu=args.fused_gelu,
            channels_last=args.channels_last,
            fused_decoder=args.fused_decoder,
            attention_kernel=args.attention_kernel,
        )
        backend = random_torch_backend(args, resolution, batch, options)
    on_cuda = device.startswith("cuda")
    build_s = time.perf_counter() - t0
    _say(f"    backend ready in {build_s:.0f} s")
    peak = matmul_tflops(torch.device(device)) if on_cuda else None
    text = backend.encode_text(BENCH_PROMPTS[: args.classes])
    rng = np.random.default_rng(resolution)
    flops = _flops_per_frame(backend, text) if hasattr(backend, "_vision") else None
    for cams in sorted(args.cameras):
        frames = rng.integers(0, 256, (cams, resolution, resolution, 3), dtype=np.uint8)
        # On CUDA the first batches compile and capture (over a minute at full size): say so.
        on_cuda = args.backend == "torch" and args.device.startswith("cuda") and args.warmup > 0
        compiles = " (the first compiles and captures)" if on_cuda else ""
        _say(f"    {cams} cameras: {args.warmup} warm-up batches{compiles}, then {args.iters} timed")
        t1 = time.perf_counter()
        for _ in range(args.warmup):
            backend.infer(frames, text, MIN_SCORE)
        if hasattr(backend, "save_compile_cache"):
            backend.save_compile_cache()
        warm_s = time.perf_counter() - t1
        _say(f"    warm-up done in {warm_s:.0f} s")
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        latency = []
        for _ in range(args.iters):
            t = time.perf_counter()
            backend.infer(frames, text, MIN_SCORE)
            latency.append((time.perf_counter() - t) * 1e3)
        intervals = submit_ahead_ms(backend, frames, text, args.iters) if hasattr(backend, "submit") else []
        batch_ms = summarize_ms(intervals or latency)
        row: dict[str, Any] = {
            "kind": "ours",
            "backend": args.backend,
            "resolution": resolution,
            "cameras": cams,
            "classes": args.classes,
            "queries": args.queries,
            "precision": args.precision,
            "overlap": getattr(backend, "overlap", args.overlap),  # what ran: off on the CPU
            "fused_gelu": getattr(backend, "fused_gelu", None),
            "channels_last": args.channels_last,
            "fused_decoder": getattr(backend, "fused_decoder", None),
            "fused_relu": getattr(backend, "fused_relu", None),
            "attention_kernel": getattr(backend, "attention_kernel", None),
            "engine_batch": getattr(getattr(backend, "manifest", None), "batch", batch),
            "vision_chunk": getattr(backend, "vision_chunk", None),
            "query_precision": args.query_precision,
            "batch_ms": batch_ms,
            "latency_ms": summarize_ms(latency),
            "frame_ms": batch_ms["avg"] / cams,
            "fps_per_camera": 1e3 / batch_ms["avg"],
            "total_fps": cams * 1e3 / batch_ms["avg"],
            "frames": cams * (args.warmup + 2 * args.iters),
            "build_s": build_s,
            "warmup_s": warm_s,
            # The folder used: --compile-cache, or an engine directory's own compile-cache.
            "compile_cache": getattr(getattr(backend, "options", None), "compile_cache", None),
            "buffer_mib": backend.buffer_bytes() / MIB if hasattr(backend, "buffer_bytes") else 0.0,
            "alloc_peak_mib": torch.cuda.max_memory_allocated() / MIB if on_cuda else 0.0,
            "reserved_peak_mib": torch.cuda.max_memory_reserved() / MIB if on_cuda else 0.0,
            "nvml_peak_mib": nvml_process_mib() if on_cuda else None,
            "matmul_tflops": peak,
            "gflop_per_frame": flops / 1e9 if flops else None,
            "timings_ms": getattr(backend, "last_timings", {}),
        }
        if flops and peak:
            row["mfu"] = flops * row["total_fps"] / (peak * 1e12)
        _emit(row, device)
    backend.close()


def run_peer(args: BenchArgs, resolution: int) -> None:
    """transformers' Sam3Model, eager, as a user would run it: vision features once per batch,
    then one forward per class with those features and the cached text embeddings."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from sam3stream.model.roi_align import install_into_transformers
    from sam3stream.runtime.tokenize import PromptTokenizer

    install_into_transformers()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    loaded = _random_loaded(args, resolution, args.device)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    ids, mask = PromptTokenizer(loaded.tokenizer_dir).encode(BENCH_PROMPTS[: args.classes])
    with torch.no_grad():
        text = model.get_text_features(
            input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device)
        ).pooler_output
    mask_t = torch.from_numpy(mask).to(device)
    rng = np.random.default_rng(resolution)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.empty_cache()
    for cams in sorted(args.cameras):
        frames = rng.integers(0, 256, (cams, resolution, resolution, 3), dtype=np.uint8)

        # Defaults bind this iteration's frames and camera count (step runs only within it).
        def step(frames: npt.NDArray[np.uint8] = frames, cams: int = cams) -> None:
            with torch.no_grad():
                px = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0
                vision = model.get_vision_features(pixel_values=px)
                for c in range(args.classes):
                    out = model(
                        vision_embeds=vision,
                        text_embeds=BaseModelOutputWithPooling(
                            pooler_output=text[c : c + 1].expand(cams, -1, -1)
                        ),
                        attention_mask=mask_t[c : c + 1].expand(cams, -1),
                    )
                    scores = out.pred_logits.sigmoid() * out.presence_logits.sigmoid()
                    (scores > MIN_SCORE).nonzero().cpu()
            if on_cuda:
                torch.cuda.synchronize()

        try:
            for _ in range(min(args.warmup, 2)):
                step()
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            ms = []
            for _ in range(args.peer_iters):
                t = time.perf_counter()
                step()
                ms.append((time.perf_counter() - t) * 1e3)
        except torch.OutOfMemoryError as exc:
            _emit(
                {"kind": "peer", "resolution": resolution, "cameras": cams, "error": f"out of memory: {exc}"},
                args.device,
            )
            if on_cuda:
                torch.cuda.empty_cache()
            continue
        batch_ms = summarize_ms(ms)
        _emit(
            {
                "kind": "peer",
                "resolution": resolution,
                "cameras": cams,
                "batch_ms": batch_ms,
                "latency_ms": batch_ms,
                "frame_ms": batch_ms["avg"] / cams,
                "fps_per_camera": 1e3 / batch_ms["avg"],
                "total_fps": cams * 1e3 / batch_ms["avg"],
                "frames": cams * (min(args.warmup, 2) + args.peer_iters),
                "alloc_peak_mib": torch.cuda.max_memory_allocated() / MIB if on_cuda else 0.0,
                "nvml_peak_mib": nvml_process_mib() if on_cuda else None,
                "buffer_mib": 0.0,
            },
            args.device,
        )


def check_device(args: BenchArgs) -> None:
    """Refuse a CUDA device that torch cannot see, for the runs that go through torch (ours
    with the torch backend, and the peer), before a model is built on it."""
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"--device {args.device}: torch {torch.__version__} sees no CUDA device here; run the "
            "bench on the GPU machine, or pass --device cpu (slow: meant for --random tiny)"
        )


def main() -> int:
    payload = json.loads(sys.argv[1])
    args = BenchArgs(**payload["args"])
    kind, resolution = payload["kind"], int(payload["resolution"])
    try:
        if kind == "peer" or args.backend == "torch":
            check_device(args)
        if kind == "peer":
            run_peer(args, resolution)
        else:
            run_ours(args, resolution)
    except Sam3StreamError as exc:
        # What the user can act on (no CUDA, an engine directory that does not fit) becomes the
        # row's error and one line of progress, not a traceback.
        _say(f"    {exc}")
        print(json.dumps({"kind": kind, "resolution": resolution, "error": str(exc)}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
