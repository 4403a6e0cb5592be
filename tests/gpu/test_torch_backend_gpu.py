"""On a CUDA device: the bf16 torch backend against a float32 reference on the same weights at 1008.

Random weights give near-tied scores, so top-K membership is not a fair test: each of our K rows
is compared with the reference's output for the same query index.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from transformers import Sam3Model  # noqa: E402

from sam3stream.model.build import random_model  # noqa: E402
from sam3stream.model.checkpoint import LoadedModel  # noqa: E402
from sam3stream.model.parts import padding_boxes, split_model  # noqa: E402
from sam3stream.model.roi_align import install_into_transformers  # noqa: E402
from sam3stream.model.tokenizer_files import write_tiny_tokenizer  # noqa: E402
from sam3stream.runtime import compile_cache  # noqa: E402
from sam3stream.runtime.torch_backend import TorchBackend, TorchOptions  # noqa: E402

R, B, K = 1008, 2, 50
PROMPTS = ["person", "hand", "blow gun", "counter"]


def torch_backend(
    model: Sam3Model, size: str, resolution: int, batch: int, queries: int, options: TorchOptions
) -> TorchBackend:
    """The torch backend over ``model`` (random weights of ``size``, seed 0), with a tiny tokenizer."""
    tok = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tok)
    loaded = LoadedModel(
        model=model, tokenizer_dir=tok, checkpoint_sha256="random", source=f"random:{size}:seed=0"
    )
    return TorchBackend.from_model(
        loaded, resolution=resolution, batch=batch, queries=queries, options=options
    )


@pytest.mark.parametrize(
    ("query_precision", "overlap", "fused_gelu", "channels_last", "fused_decoder", "attention_kernel"),
    [
        ("fp32", False, False, False, False, False),
        ("same", False, True, True, False, False),
        ("same", True, False, True, False, False),
        ("same", True, False, True, True, True),
    ],
)
def test_bf16_backend_matches_fp32_reference_query_by_query(
    query_precision: str,
    overlap: bool,
    fused_gelu: bool,
    channels_last: bool,
    fused_decoder: bool,
    attention_kernel: bool,
) -> None:
    install_into_transformers()
    model = random_model("full", R, seed=0, device="cuda")
    reference = split_model(copy.deepcopy(model), 200)
    options = TorchOptions(
        precision="bf16",
        query_precision=query_precision,
        overlap=overlap,
        fused_gelu=fused_gelu,
        channels_last=channels_last,
        fused_decoder=fused_decoder,
        attention_kernel=attention_kernel,
    )
    backend = torch_backend(model, "full", R, B, K, options)
    assert backend.attention_kernel is attention_kernel
    text = backend.encode_text(PROMPTS)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (B, R, R, 3), dtype=np.uint8)
    ours = backend.infer(frames, text, min_score=0.0)

    with torch.no_grad():
        f = torch.from_numpy(frames).cuda()
        fpn0, fpn1, fpn2 = reference.vision(f)
        geo, geo_mask = reference.geometry(fpn2, *padding_boxes(B, torch.device("cuda")))
        tf = torch.from_numpy(text.features).cuda()
        tm = torch.from_numpy(text.mask).cuda()
        scores, boxes, masks, _, index = reference.decoder(fpn0, fpn1, fpn2, tf, tm, geo, geo_mask)
    # Reference outputs re-ordered by query index, so row q is query q.
    order = index.argsort(dim=-1)
    ref_scores = scores.gather(-1, order).cpu().numpy()
    ref_boxes = boxes.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, 4)).cpu().numpy()
    q = ours.query_index  # [B, C, K]
    ref_s = np.take_along_axis(ref_scores, q, axis=-1)
    ref_b = np.take_along_axis(ref_boxes, q[..., None], axis=2)
    score_err = np.abs(ours.scores - ref_s)
    box_err = np.abs(ours.boxes - ref_b).max(axis=-1) * R

    ref_masks = masks.gather(
        2, order[..., None, None].expand(-1, -1, -1, *masks.shape[-2:])
    )  # [B, C, 200, M, M] by query index
    ious = []
    for row, (b, c, k) in enumerate(ours.mask_index):
        mine = ours.masks[row] > 0
        theirs = (ref_masks[b, c, q[b, c, k]] > 0).cpu().numpy()
        union = np.logical_or(mine, theirs).sum()
        ious.append(1.0 if union == 0 else np.logical_and(mine, theirs).sum() / union)
    iou = np.asarray(ious)
    report = (
        f"score err max {score_err.max():.4f}; boxes within 2 px {(box_err <= 2.0).mean():.4f} "
        f"(max {box_err.max():.2f} px); mask IoU min {iou.min():.4f} mean {iou.mean():.4f} "
        f">=0.98 {(iou >= 0.98).mean():.4f}"
    )
    print(report)
    assert score_err.max() <= 0.01, report
    assert (box_err <= 2.0).mean() >= 0.99, report
    assert iou.mean() >= 0.98, report
    backend.close()


@pytest.mark.parametrize("overlap", [False, True])
def test_partial_batch_needs_no_recapture_and_matches_full_batch(overlap: bool) -> None:
    install_into_transformers()
    model = random_model("tiny", 448, seed=0, device="cuda")
    backend = torch_backend(model, "tiny", 448, 4, 20, TorchOptions("fp32", overlap=overlap))
    text = backend.encode_text(PROMPTS[:2])
    frames = np.random.default_rng(1).integers(0, 256, (4, 448, 448, 3), dtype=np.uint8)
    full = backend.infer(frames, text, 0.0)
    graphs = len(backend._vision_graphs) + len(backend._decoder_graphs)
    part = backend.infer(frames[:3], text, 0.0)
    np.testing.assert_allclose(part.scores, full.scores[:3], atol=1e-4)
    # Slots already captured serve the smaller batch (the frame buffer alternates, so at most
    # one more set of vision graphs exists after both buffers were used once).
    backend.infer(frames, text, 0.0)
    assert len(backend._decoder_graphs) <= 4
    assert len(backend._vision_graphs) + len(backend._decoder_graphs) <= 2 * graphs
    backend.close()


def test_after_warm_up_no_batch_compiles_or_captures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the pipeline relies on to start cameras only when the engine is ready: after
    warm_up, full and partial batches on either frame buffer replay graphs that exist. The
    warm-up also leaves what it compiled in the compile cache; a save after it writes only when
    something new was compiled (another prompt count)."""
    install_into_transformers()
    model = random_model("tiny", 448, seed=0, device="cuda")
    options = TorchOptions("fp32", typical_batch=1, compile_cache=str(tmp_path))
    backend = torch_backend(model, "tiny", 448, 4, 20, options)
    text = backend.encode_text(PROMPTS[:2])
    assert backend.warm_up(text) > 0
    saved = list(tmp_path.glob("*.bin"))
    assert len(saved) == 1 and "_448x4_c1d1_fp32." in saved[0].name
    first_size = saved[0].stat().st_size
    assert first_size > 0
    captured = (dict(backend._vision_graphs), dict(backend._decoder_graphs))
    assert len(captured[0]) == 2 * 4 and len(captured[1]) == 4  # chunk 1: 4 slots x 2 buffers
    frames = np.random.default_rng(2).integers(0, 256, (4, 448, 448, 3), dtype=np.uint8)
    for n in (4, 1, 3, 4, 2):
        backend.infer(frames[:n], text, 0.0)
    assert (backend._vision_graphs, backend._decoder_graphs) == captured
    saves: list[Path] = []
    real_save = compile_cache.save
    monkeypatch.setattr(compile_cache, "save", lambda base: saves.append(base) or real_save(base))
    assert backend.save_compile_cache() == 0 and saves == []  # nothing compiled since the warm-up
    backend.infer(frames, backend.encode_text(PROMPTS[:3]), 0.0)  # new decoder graphs
    backend.close()
    assert len(saves) == 1
    (replaced,) = tmp_path.glob("*.bin")  # the new file holds the first one's graphs too
    assert replaced != saved[0] and replaced.stat().st_size > first_size


def test_overlap_gives_the_serial_outputs_bit_for_bit() -> None:
    """The decoder on its own stream beside the next frame's vision step runs the same kernels on
    the same inputs, so every batch must come out identical to the serial path's. Built second,
    the overlapped backend reuses the compiled steps, so its very first batch already runs both
    streams at once (graphs that shared a cuBLAS workspace across the two streams broke this)."""
    install_into_transformers()
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 256, (n, R, R, 3), dtype=np.uint8) for n in (B, B, 1, B)]
    results = {}
    for overlap in (False, True):
        model = random_model("full", R, seed=0, device="cuda")
        # The epilogue forms are pinned: left to the start-up timings, the two could differ.
        options = TorchOptions(overlap=overlap, fused_gelu=False, fused_decoder=False)
        backend = torch_backend(model, "full", R, B, K, options)
        text = backend.encode_text(PROMPTS)
        results[overlap] = [backend.infer(frames, text, min_score=0.0) for frames in batches]
        backend.close()
        del backend, model
    for n, (serial, overlapped) in enumerate(zip(results[False], results[True], strict=True)):
        for field in ("scores", "boxes", "presence", "query_index", "masks", "mask_index"):
            np.testing.assert_array_equal(
                getattr(overlapped, field), getattr(serial, field), err_msg=f"batch {n}: {field}"
            )


def test_live_backends_never_share_a_stream() -> None:
    """torch's stream pool wraps after 32 streams; each backend takes five. Six live backends get
    30 distinct streams, a seventh is refused with a clear error, and closing one frees its share."""
    import gc

    from sam3stream.errors import BackendUnavailableError
    from sam3stream.runtime import stream_lease

    gc.collect()  # backends of earlier tests give their streams back when collected
    # Streams an earlier test's backend still holds would make this test fail for another reason.
    held = {str(device): len(ids) for device, ids in stream_lease._held.items() if ids}
    assert not held, f"streams still held by earlier backends: {held}"
    install_into_transformers()
    model = random_model("tiny", 448, seed=0, device="cuda")
    options = TorchOptions("fp32", overlap=True, fused_gelu=False, attention_kernel=False)
    backends = [torch_backend(model, "tiny", 448, 2, 20, options) for _ in range(6)]
    ids = [
        s.cuda_stream
        for b in backends
        for s in (b._copy_stream, b._compute_stream, b._decoder_stream, *b._capture_streams.values())
    ]
    assert len(ids) == 30
    assert len(set(ids)) == 30
    with pytest.raises(BackendUnavailableError, match="separate processes"):
        torch_backend(model, "tiny", 448, 2, 20, options)
    backends.pop().close()
    extra = torch_backend(model, "tiny", 448, 2, 20, options)
    text = extra.encode_text(PROMPTS[:2])
    frames = np.random.default_rng(3).integers(0, 256, (2, 448, 448, 3), dtype=np.uint8)
    assert extra.infer(frames, text, 0.0).scores.shape[0] == 2
    for backend in [*backends, extra]:
        backend.close()
