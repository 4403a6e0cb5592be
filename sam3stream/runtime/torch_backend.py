"""The torch backend: the same four parts as the ONNX graphs, run by PyTorch on CUDA.

What makes it fast and small (docs/design.md has the reasoning):

- bf16 weights (fp16 selectable); RoPE tables stay float32, as transformers computes them.
- Fixed shapes: the vision encoder (+ geometry encoder) runs in chunks of ``vision_chunk``
  frames and the decoder one frame (x all classes) at a time, each step compiled once
  (torch.compile) and captured once per slot in a CUDA graph that reads and writes static
  buffers. A partial batch replays fewer graphs: nothing recompiles or reallocates.
- Chunking bounds activation memory: at 1008 the decoder's mask head works on [C, 256, 288, 288]
  maps; doing all 8 frames x 4 classes at once would need ~10 GB.
- Frames go up as uint8 from pinned memory on a copy stream; normalisation happens on the GPU
  inside the vision step. ``submit`` returns before the GPU finishes, so the caller can
  upload batch n+1 while batch n computes (the GPU worker does this).
- The text encoder runs on the host in float32 once per prompt set and never occupies the GPU.
- Kept masks can be resized to the frames' size and run-length encoded on the device
  (``mask_sizes``; runtime/mask_encode.py): the host then only packs the runs into strings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.errors import BackendUnavailableError, EngineMismatchError, GpuMemoryError, InputError
from sam3stream.runtime import compile_cache
from sam3stream.runtime.allocator import prefer_expandable_segments
from sam3stream.runtime.contract import PAD_BOX_LABEL, check_frames
from sam3stream.runtime.kept_masks import Pending, already_complete, gather_masks, with_encoded_masks
from sam3stream.runtime.manifest import EngineManifest, read_manifest
from sam3stream.runtime.startup_choices import StartupChoices
from sam3stream.runtime.stream_lease import StreamLease
from sam3stream.runtime.tokenize import PromptTokenizer
from sam3stream.runtime.types import RawOutputs, TextFeatures

if TYPE_CHECKING:
    import torch

    from sam3stream.model.checkpoint import LoadedModel
    from sam3stream.model.parts import Parts

__all__ = ["Pending", "TorchBackend", "TorchOptions"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TorchOptions:
    precision: str = "bf16"  # bf16 | fp16 | fp32
    compile: bool = True  # torch.compile each step (CUDA only)
    compile_mode: str | None = None  # e.g. "max-autotune-no-cudagraphs"
    cuda_graphs: bool = True  # capture each step once per slot (CUDA only)
    vision_chunk: int | None = None  # frames per vision step; None: chosen from the resolution
    # Frames a batch usually holds when that is fewer than the engine's batch (a service with 3
    # cameras on a batch-8 engine): the vision chunk is chosen for it, so that 1 camera at 560
    # runs 1 frame per step rather than a chunk of 4 with 3 padding frames. None: the batch.
    typical_batch: int | None = None
    decoder_frames: int = 1  # frames per decoder step (x all classes)
    # The decoder's query path (DETR decoder, box head, scoring). Box refinement is float32 either
    # way (bf16 boxes are off by up to 4 px at 1008); "same" runs the attention at ``precision``
    # (25% faster at 1008 on the H200, boxes within 0.65 px), "fp32" runs all of it in float32.
    query_precision: str = "same"
    # Run each frame's decoder on a second stream while the next frames' vision steps run, filling
    # the gaps the decoder's small kernels leave (+5% on the H200 at 1008 and 672; the decoder
    # is mostly compute-bound). Costs a second CUDA graph memory pool (~150 MiB at 1008 x 8).
    overlap: bool = True
    # The ViT MLP's GELU in the first GEMM's epilogue (cuBLASLt, tanh form of GELU; see
    # runtime/vit_rewrite.py). None: on CUDA, time both forms at the vision step's shape at start.
    fused_gelu: bool | None = None
    # The convolutions (FPN, pixel decoder, instance projection) and the FPN buffers in
    # channels-last layout: the ViT's tokens already are, and cuDNN's kernels want it (no layout
    # conversions: +3% and 262 MiB less at 1008 x 8 on the H200).
    channels_last: bool = True
    # The decoder's GroupNorm statistics and DETR encoder ReLUs in fewer kernels
    # (runtime/decoder_rewrite.py; the ReLU epilogue only where it times faster). Compiled CUDA
    # only (+2.5-2.9% at 1008 x 8 on the H200, same memory; docs/bench).
    fused_decoder: bool = True
    # The DETR encoder's self-attention through our Triton kernel (runtime/attention_kernel.py).
    # None: on CUDA with Triton installed, time it against SDPA at the encoder's shape at start
    # and keep the faster; True requires Triton.
    attention_kernel: bool | None = None
    # A folder for torch.compile's artifacts (runtime/compile_cache.py): loaded at start, saved
    # after the warm-up, so that a start where inductor's own cache is empty skips code generation;
    # with them the start-up choices timed (the forms above left to None), taken as recorded later.
    compile_cache: str | None = None


# The attribute a model carries once a backend has set it up in place (TorchBackend._claim_model).
_SET_UP_AS = "_sam3stream_set_up_as"


def default_vision_chunk(resolution: int, batch: int) -> int:
    """Frames per vision step: enough tokens to fill the GPU, few enough to bound activations,
    and as few padding frames in a full batch as possible (at 672 a chunk of 3 would run 9
    frames for 8 cameras; 2 runs 8)."""
    tokens = (resolution // 14) ** 2
    budget = min(max(1, 8192 // tokens), batch)  # 1008 -> 1, 672 -> 3, 560 -> 5, 448 -> 8
    # Only chunks of at least half the budget: smaller ones would leave the GPU under-filled.
    candidates = range(budget, (budget + 1) // 2 - 1, -1)
    return min(candidates, key=lambda chunk: -(-batch // chunk) * chunk)


def _dtype(precision: str) -> torch.dtype:
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision not in table:
        raise InputError(f"precision must be one of {', '.join(table)}, got {precision!r}")
    return table[precision]


class TorchBackend:
    """Backend protocol over :class:`~sam3stream.model.parts.Parts` on a torch device."""

    def __init__(
        self,
        engine_dir: Path | None = None,
        device: str = "cuda",
        options: TorchOptions | None = None,
        *,
        loaded: LoadedModel | None = None,
        resolution: int | None = None,
        batch: int | None = None,
        queries: int | None = None,
    ) -> None:
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailableError(
                'the torch backend needs PyTorch: pip install "sam3stream[gpu]"'
            ) from exc
        self.options = options or TorchOptions()
        self.device = torch.device(device)
        # Whether callers should have kept masks encoded here (``mask_sizes``): on a GPU that
        # is microseconds a mask against milliseconds of host numpy; on the CPU the host's
        # encoder, which skips the pixels away from a mask's edge, is faster.
        self.encodes_masks = self.device.type == "cuda"
        prefer_expandable_segments(str(self.device))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                "the torch backend was asked for CUDA but this PyTorch sees no CUDA device "
                f'(torch {torch.__version__}); use backend = "onnxruntime" on the CPU or install a CUDA build'
            )
        self._manifest, loaded, tokenizer_dir = _resolve_source(
            engine_dir, loaded, resolution, batch, queries
        )
        self._tokenizer = PromptTokenizer(tokenizer_dir)
        with self._out_of_memory_is_explained():
            self._setup(loaded)

    @contextlib.contextmanager
    def _out_of_memory_is_explained(self) -> Iterator[None]:
        """Turn a CUDA out-of-memory error into one that says what to change."""
        import torch

        try:
            yield
        except torch.OutOfMemoryError as exc:
            m = self._manifest
            on_cuda = self.device.type == "cuda"
            free, total = torch.cuda.mem_get_info(self.device) if on_cuda else (0, 0)
            raise GpuMemoryError(
                f"not enough GPU memory for batch {m.batch} at {m.resolution}x{m.resolution} "
                f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB free): lower batching.max_batch or the "
                "resolution (`sam3stream plan --vram-gb N --cameras M` suggests one), or free the GPU "
                f"({str(exc).splitlines()[0]})"
            ) from None

    @classmethod
    def from_model(
        cls,
        loaded: LoadedModel,
        *,
        resolution: int,
        batch: int,
        queries: int,
        device: str = "cuda",
        options: TorchOptions | None = None,
    ) -> TorchBackend:
        return cls(None, device, options, loaded=loaded, resolution=resolution, batch=batch, queries=queries)

    # -- setup -------------------------------------------------------------------------------

    def _setup(self, loaded: LoadedModel) -> None:
        import torch

        from sam3stream.model.parts import split_model
        from sam3stream.model.roi_align import install_into_transformers
        from sam3stream.runtime.decoder_rewrite import (
            fuse_encoder_relu,
            rewrite_decoder,
            use_attention_kernel,
        )
        from sam3stream.runtime.precomputed import PrecomputedPositions, precompute_rotary
        from sam3stream.runtime.vit_rewrite import fuse_mlp_gelu, fuse_qkv

        install_into_transformers()
        m = self._manifest
        opts = self.options
        on_cuda = self.device.type == "cuda"
        self._compile_cache: Path | None = None
        self._compiled_shapes = compile_cache.CompiledShapes()  # what a save at close would add
        self._compiles = on_cuda and opts.compile  # torch.compile runs on CUDA only
        # Read by _claim_model, before the decoder is rewritten below.
        self.fused_decoder = opts.fused_decoder and self._compiles
        recorded: dict[str, bool] = {}  # start-up choices an earlier start timed
        typical = min(m.batch, opts.typical_batch or m.batch)
        self.vision_chunk = opts.vision_chunk or default_vision_chunk(m.resolution, typical)
        self.decoder_frames = min(opts.decoder_frames, m.batch)
        if opts.compile_cache:
            self._compile_cache = compile_cache.cache_base(
                Path(opts.compile_cache),
                torch_version=torch.__version__,
                device=compile_cache.device_label(self.device),
                resolution=m.resolution,
                batch=m.batch,
                vision_chunk=self.vision_chunk,
                decoder_frames=self.decoder_frames,
                precision=opts.precision,
                mode=opts.compile_mode,
            )
            recorded = compile_cache.load_choices(compile_cache.choices_file(self._compile_cache))
            if self._compiles:
                # Before anything compiles: what was loaded is what the compiles below can hit.
                compile_cache.load(self._compile_cache)
        if on_cuda and opts.precision != "fp32":
            # The float32 query path may use TF32 tensor cores: 10 mantissa bits keep boxes well
            # inside a pixel at 1008 (bf16's 7 do not) at a fraction of full float32's cost.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.dtype = _dtype(opts.precision)
        dev = self.device
        # Leases are per GPU: "cuda" and "cuda:0" may name the same one.
        gpu = (torch.cuda.current_device() if dev.index is None else dev.index) if on_cuda else -1
        # torch.cuda.Stream / Event constructors are unannotated in torch.
        self._streams = StreamLease(gpu, lambda: torch.cuda.Stream(dev))  # type: ignore[no-untyped-call]
        weakref.finalize(self, self._streams.release)
        # The start-up timings capture on the stream the vision graphs will be captured on:
        # cuBLAS keeps a workspace (32 MiB on Hopper) for every stream it ran on, for good.
        vision_capture = self._streams.draw() if on_cuda else None
        choices = StartupChoices(self.device, self.dtype, recorded, vision_capture)
        model = loaded.model
        self._claim_model(model)
        model.config._attn_implementation = "sdpa"
        sub: Any  # transformers types each sub-config as dict | PreTrainedConfig | None
        for sub in (
            model.config.detr_decoder_config,
            model.config.detr_encoder_config,
            model.config.geometry_encoder_config,
            model.config.mask_decoder_config,
        ):
            sub._attn_implementation = "sdpa"
        parts: Parts = split_model(model, m.queries)
        fuse_qkv(parts.vision.backbone)
        # The text encoder stays on the host in float32: it runs once per prompt set.
        self._text = parts.text.float().to("cpu")
        self._vision, self._geometry, self._decoder = parts.vision, parts.geometry, parts.decoder
        # The decoder's query path may stay float32 (see parts.Decoder and TorchOptions).
        query_modules = (self._decoder.detr_decoder, self._decoder.scoring)
        wide = (
            {id(p) for m in query_modules for p in m.parameters()}
            if opts.query_precision == "fp32"
            else set()
        )
        for module in (self._vision, self._geometry, self._decoder):
            module.to(self.device)
            # Parameters only: the RoPE buffers must stay float32 (bf16 cannot hold the positions).
            for param in module.parameters():
                if id(param) not in wide:
                    param.data = param.data.to(self.dtype)
        precompute_rotary(self._vision.backbone)
        positions = PrecomputedPositions(self._decoder.position_encoding, m.grid, self.device, self.dtype)
        self._decoder.position_encoding = self._geometry.position_encoding = positions
        self.fused_gelu = choices.epilogue(
            opts.fused_gelu, self._vision.backbone.layers[0].mlp, "gelu", m.grid**2 * self.vision_chunk
        )
        if self.fused_gelu:
            fuse_mlp_gelu(self._vision.backbone)
        self.fused_relu = False
        if self.fused_decoder:
            rewrite_decoder(self._decoder)
            # Timed for 4 classes, the common prompt count; the choice does not change later.
            tokens = self.decoder_frames * 4 * m.grid**2
            encoder = self._decoder.detr_encoder
            self.fused_relu = choices.epilogue(None, encoder.layers[0].mlp, "relu", tokens)
            if self.fused_relu:
                fuse_encoder_relu(encoder)
        attention = self._decoder.detr_encoder.layers[0].self_attn
        self.attention_kernel = choices.attention_kernel(
            opts.attention_kernel, self.decoder_frames * 4, attention, m.grid**2
        )
        if self.attention_kernel:
            use_attention_kernel(self._decoder.detr_encoder)
        if choices.timed and on_cuda:
            # The timings' CUDA graphs held private memory pools: give them back before the
            # buffers and graphs are allocated, or they stay in the process's cache.
            torch.cuda.empty_cache()
        if choices.timed and self._compile_cache is not None:
            compile_cache.save_choices(
                compile_cache.choices_file(self._compile_cache), {**recorded, **choices.timed}
            )
        slots = -(-m.batch // self.vision_chunk) * self.vision_chunk
        dec_slots = -(-m.batch // self.decoder_frames) * self.decoder_frames
        r, g, d = m.resolution, m.grid, m.model.hidden_size
        dev, dt = self.device, self.dtype
        # Static buffers, sized once for the largest batch (rounded up to whole steps).
        # Two frame buffers: batch n+1 uploads into one while batch n's vision step reads the other.
        self._frame_bufs = [
            torch.zeros(max(slots, dec_slots), r, r, 3, dtype=torch.uint8, device=dev) for _ in range(2)
        ]
        self._turn = 0
        self._consumed: list[Any] = [None, None]  # event: vision step done with that buffer
        fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
        if opts.channels_last:
            convs = (self._vision.fpn_layers, self._decoder.pixel_decoder, self._decoder.instance_projection)
            for param in (p for conv in convs for p in conv.parameters() if p.dim() == 4):
                param.data = param.data.contiguous(memory_format=torch.channels_last)
        fpn_rows = max(slots, dec_slots)
        self._fpn0, self._fpn1, self._fpn2 = (
            torch.zeros(fpn_rows, d, s * g, s * g, dtype=dt, device=dev).contiguous(memory_format=fmt)
            for s in (4, 2, 1)
        )
        self._geo: torch.Tensor | None = None
        self._geo_mask: torch.Tensor | None = None
        self._boxes = torch.zeros(self.vision_chunk, 1, 4, dtype=dt, device=dev)
        self._box_labels = torch.full((self.vision_chunk, 1), PAD_BOX_LABEL, dtype=torch.long, device=dev)
        self._pinned = [
            torch.zeros(m.batch, r, r, 3, dtype=torch.uint8, pin_memory=on_cuda) for _ in range(2)
        ]
        self._copy_stream = self._streams.draw() if on_cuda else None
        self._compute_stream = self._streams.draw() if on_cuda else None
        self._vision_step = self._maybe_compile(self._vision_fn)
        self._decoder_step = self._maybe_compile(self._decoder_fn)
        self._vision_graphs: dict[tuple[int, int], Any] = {}
        self._decoder_graphs: dict[int, Any] = {}
        self._text_key: tuple[str, ...] | None = None
        self._last_text: TextFeatures | None = None
        self._text_buf: torch.Tensor | None = None
        self._text_mask_buf: torch.Tensor | None = None
        self._outputs: dict[str, torch.Tensor] = {}
        self._inflight: Pending | None = None
        self._pool = torch.cuda.graph_pool_handle() if on_cuda and opts.cuda_graphs else None
        overlap = on_cuda and opts.overlap
        self._decoder_stream = self._streams.draw() if overlap else None
        # Graphs that may run at the same time must not share a pool.
        separate = overlap and self._pool is not None
        self._decoder_pool = torch.cuda.graph_pool_handle() if separate else self._pool
        # Graph pool -> the stream its graphs are captured on (see _capture); leased, so that no
        # two pools, of this backend or another, capture on the same stream. The vision pool
        # takes the stream the start-up timing ran on.
        self._capture_streams: dict[Any, Any] = {}
        if self._pool is not None:
            self._capture_streams[self._pool] = vision_capture
        if self._decoder_pool is not None and self._decoder_pool not in self._capture_streams:
            self._capture_streams[self._decoder_pool] = self._streams.draw()
        self.last_timings: dict[str, float] = {}
        log.info(
            "torch backend ready",
            device=str(dev),
            precision=opts.precision,
            resolution=r,
            batch=m.batch,
            queries=m.queries,
            vision_chunk=self.vision_chunk,
            decoder_frames=self.decoder_frames,
            compile=self._compiles,
            cuda_graphs=opts.cuda_graphs and on_cuda,
            overlap=overlap,
            fused_gelu=self.fused_gelu,
            channels_last=opts.channels_last,
            fused_decoder=self.fused_decoder,
            fused_relu=self.fused_relu,
            attention_kernel=self.attention_kernel,
        )

    def _claim_model(self, model: Any) -> None:
        """Backends set their model up in place (moved, converted to their precision, layouts and
        modules rewritten), so backends built from one model share that set-up. Another backend's
        with other settings would silently change this one's under it: refuse it instead."""
        import torch

        opts, dev = self.options, self.device
        if dev.type == "cuda" and dev.index is None:  # "cuda" and "cuda:0" may name one GPU
            dev = torch.device("cuda", torch.cuda.current_device())
        settings = {
            "device": str(dev),
            "precision": opts.precision,
            "query_precision": opts.query_precision,
            "channels_last": opts.channels_last,
            "fused_decoder": self.fused_decoder,
        }
        earlier: dict[str, object] | None = getattr(model, _SET_UP_AS, None)
        if earlier is not None and earlier != settings:
            differ = ", ".join(
                f"{key} {earlier.get(key)!r} there, {value!r} here"
                for key, value in settings.items()
                if earlier.get(key) != value
            )
            raise InputError(
                f"this model was set up in place by another backend with other settings ({differ}); "
                "load the model again for a backend with these"
            )
        setattr(model, _SET_UP_AS, settings)

    def _maybe_compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if not self._compiles:
            return fn
        import torch

        compiled = torch.compile(fn, dynamic=False, mode=self.options.compile_mode)
        return self._compiled_shapes.track(fn.__name__, compiled)

    # -- the steps (pure tensor functions of static buffers) ---------------------------------------

    def _vision_fn(
        self, frames: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        fpn0, fpn1, fpn2 = self._vision(frames)
        geo, geo_mask = self._geometry(fpn2, boxes, labels)
        return fpn0, fpn1, fpn2, geo, geo_mask

    def _decoder_fn(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: tuple[torch.Tensor, ...] = self._decoder(*inputs)
        return out

    def _run_vision_slot(self, start: int) -> None:
        end = start + self.vision_chunk
        frames = self._frame_bufs[self._turn][start:end]
        fpn0, fpn1, fpn2, geo, geo_mask = self._vision_step(frames, self._boxes, self._box_labels)
        if self._geo is None or self._geo_mask is None:
            raise RuntimeError("geometry buffers are allocated before the first vision step")
        self._fpn0[start:end].copy_(fpn0)
        self._fpn1[start:end].copy_(fpn1)
        self._fpn2[start:end].copy_(fpn2)
        self._geo[start:end].copy_(geo)
        self._geo_mask[start:end].copy_(geo_mask)

    def _run_decoder_slot(self, start: int) -> None:
        end = start + self.decoder_frames
        assert self._geo is not None and self._geo_mask is not None
        assert self._text_buf is not None and self._text_mask_buf is not None
        outputs = self._decoder_step(
            self._fpn0[start:end],
            self._fpn1[start:end],
            self._fpn2[start:end],
            self._text_buf,
            self._text_mask_buf,
            self._geo[start:end],
            self._geo_mask[start:end],
        )
        for name, value in zip(("scores", "boxes", "masks", "presence", "index"), outputs, strict=True):
            self._outputs[name][start:end].copy_(value)

    # -- CUDA graphs ---------------------------------------------------------------------------

    def _replay(
        self, graphs: dict[Any, Any], key: Any, start: int, run: Callable[[int], None], pool: Any
    ) -> None:
        if pool is None:
            run(start)
            return
        graph = graphs.get(key)
        if graph is None:
            graph = self._capture(run, start, pool)
            graphs[key] = graph
        graph.replay()

    def _capture(self, run: Callable[[int], None], start: int, pool: Any) -> Any:
        import torch

        stream = torch.cuda.current_stream(self.device)
        # One capture stream per graph pool. Per pool, not per graph: the caching allocator keeps
        # blocks per stream, so a fresh stream per capture would strand each warm-up's activations
        # in its own cache. Not one for all: cuBLAS(Lt) keeps one workspace per stream and a graph
        # bakes in the workspace of the stream it was captured on, so vision and decoder graphs
        # captured on one stream would share a workspace while they run side by side (overlap),
        # and corrupt each other's GEMMs. Graphs of one pool never run at the same time.
        side = self._capture_streams[pool]
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up: compile, autotune, allocator settles
                run(start)
        side.synchronize()
        # The warm-up's activations sit in the ordinary cache; the graph gets its own pool.
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=side):
            run(start)
        stream.wait_stream(side)
        return graph

    # -- Backend protocol ------------------------------------------------------------------------

    @property
    def manifest(self) -> EngineManifest:
        return self._manifest

    @property
    def overlap(self) -> bool:
        """Whether the decoder runs on a second stream (asked for, and on CUDA)."""
        return self._decoder_stream is not None

    def encode_text(self, prompts: list[str]) -> TextFeatures:
        import torch

        # The same prompts again (the pipeline's warm-up, then its worker): the last result.
        if self._last_text is not None and self._last_text.prompts == tuple(prompts):
            return self._last_text
        ids, mask = self._tokenizer.encode(prompts)
        with torch.no_grad():
            features = self._text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        self._last_text = TextFeatures(
            prompts=tuple(prompts), features=features.astype(np.float32), mask=mask.astype(bool)
        )
        return self._last_text

    def _bind_text(self, text: TextFeatures) -> None:
        """Copy the prompt features to their static device buffers; new class count => new graphs."""
        import torch

        if self._text_key == text.prompts:
            return
        self._collect_inflight()  # the batch in flight still reads the old prompt buffers
        m = self._manifest
        classes = text.num_classes
        if self._text_buf is None or self._text_buf.shape[0] != classes:
            self._decoder_graphs.clear()
            dev, dt = self.device, self.dtype
            rows = self._fpn0.shape[0]
            k, ms = m.queries, m.mask_size
            self._text_buf = torch.zeros(classes, *text.features.shape[1:], dtype=dt, device=dev)
            self._text_mask_buf = torch.zeros(classes, text.mask.shape[1], dtype=torch.bool, device=dev)
            f32 = torch.float32
            self._outputs = {
                "scores": torch.zeros(rows, classes, k, dtype=f32, device=dev),
                "boxes": torch.zeros(rows, classes, k, 4, dtype=f32, device=dev),
                "masks": torch.zeros(rows, classes, k, ms, ms, dtype=dt, device=dev),
                "presence": torch.zeros(rows, classes, dtype=f32, device=dev),
                "index": torch.zeros(rows, classes, k, dtype=torch.long, device=dev),
            }
        assert self._text_buf is not None and self._text_mask_buf is not None
        self._text_buf.copy_(torch.from_numpy(text.features))
        self._text_mask_buf.copy_(torch.from_numpy(text.mask))
        self._text_key = text.prompts

    def _ensure_geo_buffers(self) -> None:
        import torch

        if self._geo is None:
            with torch.no_grad():
                geo, geo_mask = self._geometry(self._fpn2[:1], self._boxes[:1], self._box_labels[:1])
            rows = self._fpn0.shape[0]
            self._geo = torch.zeros(rows, *geo.shape[1:], dtype=geo.dtype, device=self.device)
            self._geo_mask = torch.zeros(rows, *geo_mask.shape[1:], dtype=geo_mask.dtype, device=self.device)

    def submit(
        self,
        frames: npt.NDArray[np.uint8],
        text: TextFeatures,
        min_score: float,
        mask_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> Pending:
        """Queue a batch on the GPU and return at once; ``result()`` waits for it.

        ``mask_sizes``: (width, height) per frame to have the kept masks resized and encoded on
        the device (``RawOutputs.mask_counts``); None returns their logits."""
        import torch

        check_frames(frames, self._manifest)
        batch = frames.shape[0]
        if mask_sizes is not None and len(mask_sizes) != batch:
            raise ValueError(f"{len(mask_sizes)} mask sizes for {batch} frames")
        with torch.no_grad(), self._out_of_memory_is_explained():
            self._ensure_geo_buffers()
            self._bind_text(text)
            self._turn ^= 1
            pinned, device_frames = self._pinned[self._turn], self._frame_bufs[self._turn]
            consumed = self._consumed[self._turn]
            if consumed is not None:
                consumed.synchronize()  # the host buffer is free once its upload was consumed
            pinned[:batch].numpy()[...] = frames
            events = self._events()
            if self._copy_stream is not None and self._compute_stream is not None:
                with torch.cuda.stream(self._copy_stream):
                    device_frames[:batch].copy_(pinned[:batch], non_blocking=True)
                # The upload above overlaps the previous batch's compute. Its outputs live in the
                # shared output buffers, so collect them before queuing this batch's compute.
                self._collect_inflight()
                self._compute_stream.wait_stream(self._copy_stream)
                with torch.cuda.stream(self._compute_stream):
                    self._inflight = self._launch(batch, min_score, events, mask_sizes)
                return self._inflight
            device_frames[:batch].copy_(pinned[:batch])
            return self._launch(batch, min_score, events, mask_sizes)

    def _collect_inflight(self) -> None:
        if self._inflight is not None:
            self._inflight.collect()
            self._inflight = None

    def _events(self) -> list[Any]:
        import torch

        if self.device.type != "cuda":
            return []
        return [torch.cuda.Event(enable_timing=True) for _ in range(3)]  # type: ignore[no-untyped-call]

    def _launch(
        self, batch: int, min_score: float, events: list[Any], mask_sizes: Sequence[tuple[int, int]] | None
    ) -> Pending:
        import torch

        t0 = time.perf_counter()
        if events:
            events[0].record()
        vision_done: dict[int, Any] = {}
        for start in range(0, batch, self.vision_chunk):
            self._replay(self._vision_graphs, (self._turn, start), start, self._run_vision_slot, self._pool)
            if self._decoder_stream is not None:
                vision_done[start] = torch.cuda.Event()  # type: ignore[no-untyped-call]
                vision_done[start].record()
        if self.device.type == "cuda":
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
            self._consumed[self._turn] = done
        if events:
            events[1].record()
        t1 = time.perf_counter()  # on the CPU each step has finished when its call returns
        self._launch_decoders(batch, vision_done)
        t2 = time.perf_counter()
        out = {name: value[:batch] for name, value in self._outputs.items()}
        keep = out["scores"] >= min_score
        # Gathering the kept masks and copying the small outputs is queued behind the graphs.
        index = keep.nonzero() if self.device.type != "cuda" else None
        scores = out["scores"].float()
        boxes = out["boxes"].float()
        presence = out["presence"].float()
        query_index = out["index"]
        if events:
            events[2].record()
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

        def collect() -> Callable[[], RawOutputs]:
            if stream is not None:
                stream.synchronize()
            with torch.no_grad():
                kept_index = keep.nonzero() if index is None else index
                mask_index = kept_index.cpu().numpy().astype(np.int64)
                result = RawOutputs(
                    scores=scores.cpu().numpy(),
                    boxes=boxes.cpu().numpy(),
                    presence=presence.cpu().numpy(),
                    query_index=query_index.cpu().numpy().astype(np.int64),
                    masks=np.empty((len(mask_index), 0, 0), np.float32),
                    mask_index=mask_index,
                )
                complete: Callable[[], RawOutputs]
                if mask_sizes is None:
                    result = dataclasses.replace(result, masks=gather_masks(out["masks"], kept_index))
                    complete = functools.partial(already_complete, result)
                else:
                    complete = with_encoded_masks(
                        result, out["masks"], kept_index, mask_sizes, stream, self._copy_stream
                    )
            if events:
                self.last_timings = {
                    "vision": events[0].elapsed_time(events[1]),
                    "decoder": events[1].elapsed_time(events[2]),
                }
            else:
                self.last_timings = {"vision": (t1 - t0) * 1e3, "decoder": (t2 - t1) * 1e3}
            return complete

        return Pending(collect)

    def _launch_decoders(self, batch: int, vision_done: dict[int, Any]) -> None:
        """Queue the decoder steps: on the current stream, or (overlap) on the decoder stream, each
        after the vision step that wrote its frames, joined back before the outputs are read."""
        import torch

        side = self._decoder_stream
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for start in range(0, batch, self.decoder_frames):
                if side is not None:
                    # Also orders everything queued on the main stream before that vision step.
                    last = min(start + self.decoder_frames, batch) - 1
                    side.wait_event(vision_done[last // self.vision_chunk * self.vision_chunk])
                self._replay(self._decoder_graphs, start, start, self._run_decoder_slot, self._decoder_pool)
        if side is not None:  # back on the main stream: it waits for the decoders
            torch.cuda.current_stream(self.device).wait_stream(side)

    def infer(
        self,
        frames: npt.NDArray[np.uint8],
        text: TextFeatures,
        min_score: float,
        mask_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> RawOutputs:
        return self.submit(frames, text, min_score, mask_sizes).result()

    @property
    def _compiles_on_first_use(self) -> bool:
        return self.device.type == "cuda" and (self.options.compile or self.options.cuda_graphs)

    def warm_up(self, text: TextFeatures) -> float:
        """Compile every step and capture every slot's CUDA graphs now, before frames arrive:
        otherwise the first batch waits for it (70-85 s at full size on the H200) and a later,
        fuller batch captures more. Two full batches, one per frame buffer (graphs are per
        buffer). Seconds spent; nothing to do without compile or CUDA graphs."""
        if not self._compiles_on_first_use:
            return 0.0
        t0 = time.perf_counter()
        r = self.manifest.resolution
        frames = np.zeros((self.manifest.batch, r, r, 3), np.uint8)
        for _ in range(2):
            self.infer(frames, text, 1.0)
        self.save_compile_cache()
        return time.perf_counter() - t0

    def save_compile_cache(self) -> int:
        """Save what this process compiled to the compile cache (TorchOptions.compile_cache), if
        one is set and it changed; bytes written. warm_up does this; call it after compiling
        otherwise (the bench's own warm-up batches)."""
        if self._compile_cache is None or not self._compiles or not self._compiled_shapes.new_since_save():
            return 0
        self._compiled_shapes.mark_saved()
        return compile_cache.save(self._compile_cache)

    def buffer_bytes(self) -> int:
        """Bytes held in static device buffers (inputs, FPN levels, outputs)."""
        tensors = [*self._frame_bufs, self._fpn0, self._fpn1, self._fpn2, *self._outputs.values()]
        if self._geo is not None:
            tensors.append(self._geo)
        return sum(t.numel() * t.element_size() for t in tensors)

    def close(self) -> None:
        import torch

        self._collect_inflight()
        # Graphs compiled after the warm-up (another prompt count) are kept for the next start too.
        # Only then: the save serialises every artifact in the process.
        self.save_compile_cache()
        self._vision_graphs.clear()
        self._decoder_graphs.clear()
        self._outputs.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        self._streams.release()


def _resolve_source(
    engine_dir: Path | None,
    loaded: LoadedModel | None,
    resolution: int | None,
    batch: int | None,
    queries: int | None,
) -> tuple[EngineManifest, LoadedModel, Path]:
    """The manifest and model: from an engine directory (its recorded source) or given directly."""
    from sam3stream.model.export import load_source

    if engine_dir is not None:
        manifest = read_manifest(engine_dir)
        source = manifest.model.source
        if source.startswith("random:"):
            _, size, seed = source.split(":")
            loaded = load_source(
                random=size,
                checkpoint=None,
                resolution=manifest.resolution,
                seed=int(seed.removeprefix("seed=")),
                cache=Path(engine_dir).parent / ".shared",
            )
        else:
            loaded = load_source(
                random=None, checkpoint=Path(source), resolution=manifest.resolution, cache=Path()
            )
        if loaded.checkpoint_sha256 != manifest.model.checkpoint_sha256:
            raise EngineMismatchError(
                f"{engine_dir} was exported from weights {manifest.model.checkpoint_sha256[:12]}, "
                f"but {source} now holds {loaded.checkpoint_sha256[:12]}; export the engines again"
            )
        return manifest, loaded, Path(engine_dir) / manifest.tokenizer
    if loaded is None or resolution is None or batch is None or queries is None:
        raise ValueError("give an engine directory, or a loaded model with resolution, batch and queries")
    manifest = EngineManifest(
        resolution=resolution,
        batch=batch,
        queries=queries,
        precision="torch",
        model=loaded.spec(),
        graphs={},
        tokenizer=".",
        versions={},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        engine_kind="torch",
    )
    return manifest, loaded, loaded.tokenizer_dir
