"""The torch backend's logic on the CPU (no compile, no CUDA graphs): same outputs as onnxruntime,
pipelined submits, and clear errors. The CUDA path is covered by tests/gpu."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import structlog
import torch

from sam3stream.errors import BackendUnavailableError, EngineMismatchError, GpuMemoryError, InputError
from sam3stream.model.checkpoint import LoadedModel
from sam3stream.runtime.onnxruntime_backend import OnnxRuntimeBackend
from sam3stream.runtime.torch_backend import TorchBackend, TorchOptions, default_vision_chunk

PROMPTS = ["person", "hand"]


@pytest.fixture(scope="module")
def backend(tiny_engines: Path) -> TorchBackend:
    return TorchBackend(tiny_engines, device="cpu", options=TorchOptions(precision="fp32"))


def test_matches_onnxruntime_on_the_same_engine_directory(backend: TorchBackend, tiny_engines: Path) -> None:
    ort = OnnxRuntimeBackend(tiny_engines)
    frames = np.random.default_rng(3).integers(0, 256, (3, 490, 490, 3), dtype=np.uint8)
    ours, theirs = (
        backend.infer(frames, backend.encode_text(PROMPTS), 0.2),
        ort.infer(frames, ort.encode_text(PROMPTS), 0.2),
    )
    np.testing.assert_allclose(ours.scores, theirs.scores, atol=1e-4)
    np.testing.assert_allclose(ours.boxes, theirs.boxes, atol=1e-4)
    assert np.array_equal(ours.mask_index, theirs.mask_index)
    np.testing.assert_allclose(ours.masks, theirs.masks, atol=1e-3)
    # Both report the same stages (infer prints them): the vision step and the decoder, timed.
    assert set(backend.last_timings) == set(ort.last_timings) == {"vision", "decoder"}
    assert all(ms > 0 for ms in backend.last_timings.values())


def test_pipelined_submits_give_each_batch_its_own_outputs(backend: TorchBackend) -> None:
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, 256, (n, 490, 490, 3), dtype=np.uint8) for n in (2, 4, 1)]
    text = backend.encode_text(PROMPTS)
    sequential = [backend.infer(b, text, 0.0).scores for b in batches]
    pending = [backend.submit(b, text, 0.0) for b in batches]  # later submits before earlier results
    for want, got in zip(sequential, pending, strict=True):
        np.testing.assert_allclose(got.result().scores, want, atol=1e-6)


def test_cuda_without_a_device_says_what_to_do(tiny_engines: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailableError, match=r"sees no CUDA device.*onnxruntime"):
        TorchBackend(tiny_engines, device="cuda")


def test_attention_kernel_forced_where_it_cannot_run_says_what_to_do(tiny_engines: Path) -> None:
    # On the CPU: no CUDA device to run it on, whether or not Triton is installed.
    with pytest.raises(BackendUnavailableError, match=r"attention_kernel=True needs Triton and a CUDA"):
        TorchBackend(
            tiny_engines, device="cpu", options=TorchOptions(precision="bf16", attention_kernel=True)
        )


def test_attention_kernel_forced_in_float32_names_the_precision(tiny_engines: Path) -> None:
    with pytest.raises(InputError, match=r"attention_kernel=True needs precision bf16 or fp16, not fp32"):
        TorchBackend(
            tiny_engines, device="cpu", options=TorchOptions(precision="fp32", attention_kernel=True)
        )


def test_attention_kernel_left_to_the_backend_stays_off_on_the_cpu(backend: TorchBackend) -> None:
    assert backend.attention_kernel is False


def test_engine_directory_from_other_weights_is_refused(tiny_engines: Path, tmp_path: Path) -> None:
    other = tmp_path / "b4_q20_r490"
    shutil.copytree(tiny_engines, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["checkpoint_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="export the engines again"):
        TorchBackend(other, device="cpu")


def test_out_of_gpu_memory_says_what_to_change(
    backend: TorchBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(*_args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(backend, "_launch", exhausted)
    frames = np.zeros((2, 490, 490, 3), np.uint8)
    with pytest.raises(
        GpuMemoryError, match=r"batch 4 at 490x490.*lower batching\.max_batch.*sam3stream plan"
    ):
        backend.infer(frames, backend.encode_text(PROMPTS), 0.3)


@pytest.mark.parametrize("resolution", [1008, 840, 672, 560, 448])
@pytest.mark.parametrize("batch", range(1, 9))
def test_vision_chunk_stays_in_budget_and_pads_as_little_as_a_full_budget_chunk(
    resolution: int, batch: int
) -> None:
    tokens = (resolution // 14) ** 2
    budget = min(max(1, 8192 // tokens), batch)
    chunk = default_vision_chunk(resolution, batch)
    assert 1 <= chunk <= budget
    assert 2 * chunk >= budget  # never a chunk that leaves the GPU half empty

    def slots(c: int) -> int:
        return -(-batch // c) * c

    assert slots(chunk) <= slots(budget)
    if batch == 8:  # the 8-camera deployments: no padding frame at any of the table's resolutions
        assert slots(chunk) == 8


def test_fewer_cameras_than_the_batch_get_a_smaller_vision_chunk_and_the_same_outputs(
    backend: TorchBackend, tiny_engines: Path
) -> None:
    """A batch-4 engine serving one camera steps one frame at a time instead of padding a chunk
    of 4; a batch of more frames than the hint still runs whole (in more steps)."""
    assert backend.vision_chunk == 4  # 490: 1225 tokens per frame, the budget allows the whole batch
    one = TorchBackend(tiny_engines, device="cpu", options=TorchOptions("fp32", typical_batch=1))
    assert one.vision_chunk == 1
    more = TorchBackend(tiny_engines, device="cpu", options=TorchOptions("fp32", typical_batch=9))
    assert more.vision_chunk == 4
    more.close()
    text = backend.encode_text(PROMPTS)
    for n in (1, 3):
        frames = np.random.default_rng(n).integers(0, 256, (n, 490, 490, 3), dtype=np.uint8)
        want, got = backend.infer(frames, text, 0.0), one.infer(frames, one.encode_text(PROMPTS), 0.0)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-5)
        np.testing.assert_allclose(got.masks, want.masks, atol=1e-3)
    one.close()


def test_channels_last_layout_gives_the_same_outputs(tiny_engines: Path) -> None:
    text = None
    outputs = []
    frames = np.random.default_rng(3).integers(0, 256, (2, 490, 490, 3), dtype=np.uint8)
    for channels_last in (False, True):
        backend = TorchBackend(
            tiny_engines, device="cpu", options=TorchOptions("fp32", channels_last=channels_last)
        )
        assert backend._fpn0.is_contiguous(memory_format=torch.channels_last) == channels_last
        text = text or backend.encode_text(["person", "hand"])
        outputs.append(backend.infer(frames, text, 0.0))
        backend.close()
    plain, last = outputs
    np.testing.assert_allclose(last.scores, plain.scores, atol=1e-5)
    np.testing.assert_allclose(last.boxes, plain.boxes, atol=1e-5)
    np.testing.assert_allclose(last.masks, plain.masks, atol=1e-3)


def test_two_frames_per_decoder_step_give_the_one_frame_outputs(tiny_engines: Path) -> None:
    """`decoder_frames=2` runs the decoder on frame pairs; an odd partial batch leaves the last
    pair half-filled with a stale frame, whose outputs must not leak into the result."""
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 256, (n, 490, 490, 3), dtype=np.uint8) for n in (4, 3, 1)]
    results = {}
    for frames_per_step in (1, 2):
        backend = TorchBackend(
            tiny_engines, device="cpu", options=TorchOptions("fp32", decoder_frames=frames_per_step)
        )
        assert backend.decoder_frames == frames_per_step
        text = backend.encode_text(PROMPTS)
        results[frames_per_step] = [backend.infer(frames, text, 0.0) for frames in batches]
        backend.close()
    for n, (one, two) in enumerate(zip(results[1], results[2], strict=True)):
        assert two.scores.shape == one.scores.shape, f"batch {n}"
        np.testing.assert_allclose(two.scores, one.scores, atol=1e-5, err_msg=f"batch {n}")
        np.testing.assert_allclose(two.boxes, one.boxes, atol=1e-5, err_msg=f"batch {n}")
        assert np.array_equal(two.mask_index, one.mask_index), f"batch {n}"
        np.testing.assert_allclose(two.masks, one.masks, atol=1e-3, err_msg=f"batch {n}")


def test_warm_up_runs_every_slot_of_both_frame_buffers(
    tiny_engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA graphs are per slot and per frame buffer: a warm-up that left one uncaptured would
    leave a later batch to capture it while frames wait."""
    backend = TorchBackend(tiny_engines, device="cpu", options=TorchOptions("fp32", typical_batch=1))
    text = backend.encode_text(PROMPTS)
    assert backend.warm_up(text) == 0.0  # on the CPU nothing compiles: nothing to do
    replayed: list[object] = []
    real_replay = backend._replay

    def recording(graphs: dict[object, object], key: object, *args: object) -> None:
        replayed.append(("vision" if graphs is backend._vision_graphs else "decoder", key))
        real_replay(graphs, key, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "_replay", recording)
    monkeypatch.setattr(TorchBackend, "_compiles_on_first_use", property(lambda self: True))
    assert backend.warm_up(text) >= 0.0
    batch = backend.manifest.batch  # 4 frames, chunk 1
    vision = {key for kind, key in replayed if kind == "vision"}
    decoder = {key for kind, key in replayed if kind == "decoder"}
    assert vision == {(turn, start) for turn in (0, 1) for start in range(batch)}
    assert decoder == set(range(batch))
    backend.close()


def test_the_same_prompts_are_encoded_once(backend: TorchBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's warm-up and then its worker ask for the same prompts; the text encoder
    (float32, on the host) runs once for them, again only for other prompts."""
    calls: list[int] = []
    real_text = backend._text

    def counting(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        calls.append(len(ids))
        return real_text(ids, mask)  # type: ignore[no-any-return]

    monkeypatch.setattr(backend, "_text", counting)
    first = backend.encode_text(["a cat", "a dog"])
    again = backend.encode_text(["a cat", "a dog"])
    other = backend.encode_text(["a dog"])
    assert calls == [2, 1]
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_allclose(other.features[0], first.features[1], atol=1e-5)


def test_kept_masks_cross_in_chunks_and_come_out_the_same(
    backend: TorchBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A low threshold keeps every mask; copied a few at a time they must be the same masks, in
    the same order, as copied all at once."""
    from sam3stream.runtime import kept_masks

    frames = np.random.default_rng(5).integers(0, 256, (2, 490, 490, 3), dtype=np.uint8)
    text = backend.encode_text(PROMPTS)
    monkeypatch.setattr(kept_masks, "MASK_CHUNK", 10**6)
    whole = backend.infer(frames, text, 0.0)
    monkeypatch.setattr(kept_masks, "MASK_CHUNK", 3)
    chunked = backend.infer(frames, text, 0.0)
    assert len(whole.mask_index) == 2 * len(PROMPTS) * backend.manifest.queries  # more than one chunk
    assert chunked.masks.dtype == np.float32
    assert np.array_equal(chunked.mask_index, whole.mask_index)
    assert np.array_equal(chunked.masks, whole.masks)


def test_masks_encoded_on_the_device_are_the_hosts_encoding_of_its_logits(backend: TorchBackend) -> None:
    """``mask_sizes``: the same kept rows, each mask's runs at its own frame's size (two sizes in
    one batch), and the detections the postprocessor makes from them are those it makes from
    the logits; pipelined, so each batch's sizes stay with that batch."""
    from msgspec.structs import replace

    from sam3stream.postprocess import _mask_counts, to_detections
    from sam3stream.rle import decode
    from tests.runtime.test_mask_encode import pixels_differing

    assert not backend.encodes_masks  # on the CPU the host's encoder is the faster one
    rng = np.random.default_rng(8)
    frames = rng.integers(0, 256, (3, 490, 490, 3), dtype=np.uint8)
    text = backend.encode_text(PROMPTS)
    sizes = [(320, 180), (320, 180), (97, 203)]
    plain = backend.infer(frames, text, 0.0)
    first = backend.submit(frames, text, 0.0, sizes)
    second = backend.submit(frames[:1], text, 0.0, [(50, 40)])
    encoded = first.result()
    assert encoded.mask_counts is not None and encoded.masks.shape == (len(plain.mask_index), 0, 0)
    np.testing.assert_array_equal(encoded.mask_index, plain.mask_index)
    assert len(plain.mask_index) > 3
    # torch's bilinear resize and the host's round their own ways: a pixel within a few float32
    # ulps of the threshold may differ (runtime/mask_encode.py), nothing else.
    for row, (b, _, _) in enumerate(plain.mask_index):
        w, h = sizes[b]
        want = _mask_counts(plain.masks[row], w, h)
        assert encoded.mask_counts[row].sum() == w * h
        assert pixels_differing(encoded.mask_counts[row], want, w, h) <= 2, row
    for b, (w, h) in enumerate(sizes):
        args = (["person", "hand"], [0.0, 0.0], 1920, 1080, (w, h))
        got, want_detections = to_detections(encoded, b, *args), to_detections(plain, b, *args)
        assert [replace(d, mask=None) for d in got] == [replace(d, mask=None) for d in want_detections]
        for d, want in zip(got, want_detections, strict=True):
            assert d.mask is not None and want.mask is not None and d.mask.size == want.mask.size
            assert np.count_nonzero(decode(d.mask) != decode(want.mask)) <= 2
    small = second.result()
    assert small.mask_counts is not None
    assert {int(c.sum()) for c in small.mask_counts} == {50 * 40}
    with pytest.raises(ValueError, match="2 mask sizes for 3 frames"):
        backend.submit(frames, text, 0.0, sizes[:2])
    nothing = backend.infer(frames, text, 1.5, sizes)  # no score reaches 1.5
    assert nothing.mask_counts == () and nothing.masks.shape[0] == 0 == len(nothing.mask_index)


def test_masks_the_device_has_no_memory_to_encode_go_to_the_host(
    backend: TorchBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory while encoding masks costs the batch nothing: its logits come back for the
    host's encoder, and the detections are the same."""
    from sam3stream.postprocess import to_detections
    from sam3stream.runtime import kept_masks

    def no_memory(*args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

    frames = np.random.default_rng(9).integers(0, 256, (2, 490, 490, 3), dtype=np.uint8)
    text = backend.encode_text(PROMPTS)
    plain = backend.infer(frames, text, 0.0)
    monkeypatch.setattr(kept_masks, "encode_kept_masks", no_memory)
    with structlog.testing.capture_logs() as logs:
        fallen_back = backend.infer(frames, text, 0.0, [(64, 48), (64, 48)])
    assert fallen_back.mask_counts is None
    warned = [e for e in logs if e["event"] == "mask_encoding_out_of_memory"]
    assert warned and warned[0]["masks"] == len(plain.masks) and "64.00 MiB" in warned[0]["error"]
    np.testing.assert_array_equal(fallen_back.masks, plain.masks)
    assert len(plain.masks) > 0
    args = (PROMPTS, [0.0, 0.0], 64, 48)
    assert [to_detections(fallen_back, b, *args) for b in range(2)] == [
        to_detections(plain, b, *args) for b in range(2)
    ]


@pytest.fixture
def tiny_tokenizer(tmp_path: Path) -> Path:
    from sam3stream.model.tokenizer_files import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def _tiny_loaded(tokenizer_dir: Path) -> LoadedModel:
    """The tiny random model at 448 (seed 0) with the tokenizer in ``tokenizer_dir``."""
    from sam3stream.model.build import random_model
    from sam3stream.model.roi_align import install_into_transformers

    install_into_transformers()
    return LoadedModel(
        model=random_model("tiny", 448, seed=0),
        tokenizer_dir=tokenizer_dir,
        checkpoint_sha256="random",
        source="random",
    )


def _cpu_backend(loaded: LoadedModel, options: TorchOptions) -> TorchBackend:
    """A batch-1 backend at 448 with 20 queries over ``loaded``, on the CPU."""
    return TorchBackend.from_model(loaded, resolution=448, batch=1, queries=20, device="cpu", options=options)


def test_backends_built_from_one_model_agree_on_its_fused_mlps(tiny_tokenizer: Path) -> None:
    """Backends from one model share its modules. A second backend finds the ViT's MLPs already
    fused by the first: it takes them as they are (it used to time a fused MLP as if it were the
    plain one and fail), and one that insists on the plain form is told what to do."""
    loaded = _tiny_loaded(tiny_tokenizer)

    def build(fused_gelu: bool | None) -> TorchBackend:
        return _cpu_backend(loaded, TorchOptions("fp32", fused_gelu=fused_gelu))

    first = build(True)
    assert first.fused_gelu
    second = build(None)
    assert second.fused_gelu
    frames = np.random.default_rng(5).integers(0, 256, (1, 448, 448, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        second.infer(frames, second.encode_text(PROMPTS), 0.5).scores,
        first.infer(frames, first.encode_text(PROMPTS), 0.5).scores,
    )
    with pytest.raises(InputError, match=r"already fused by another backend.*load the model again"):
        build(False)


def test_a_second_backend_with_other_settings_on_one_model_is_refused(tiny_tokenizer: Path) -> None:
    """The first backend converted the shared model to its precision; a second at another one
    would silently convert the first's weights under it."""
    loaded = _tiny_loaded(tiny_tokenizer)

    def build(options: TorchOptions) -> TorchBackend:
        return _cpu_backend(loaded, options)

    first = build(TorchOptions("fp32"))
    build(TorchOptions("fp32", overlap=False))  # settings that leave the model alone may differ
    with pytest.raises(InputError, match=r"precision 'fp32' there, 'bf16' here.*load the model again"):
        build(TorchOptions("bf16"))
    with pytest.raises(InputError, match=r"channels_last True there, False here"):
        build(TorchOptions("fp32", channels_last=False))
    assert all(p.dtype == torch.float32 for p in first._vision.parameters())


def test_backends_built_from_one_model_agree_on_its_attention_kernel(
    tiny_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for the DETR encoder's attention: once another backend swapped it for our kernel,
    a later backend keeps it (without timing or Triton) and one that forbids it is told what to
    do. The kernel itself runs only on CUDA; this builds backends and runs nothing."""
    from sam3stream.runtime import attention_kernel
    from sam3stream.runtime.decoder_rewrite import KernelAttention, use_attention_kernel

    loaded = _tiny_loaded(tiny_tokenizer)
    # The tiny model's head dim (8) is not one the kernel is built for; the swap is what matters.
    monkeypatch.setattr(attention_kernel, "config_for", lambda dim: None)
    assert use_attention_kernel(loaded.model.detr_encoder) == 2  # what a first backend on CUDA does

    def build(kernel: bool | None) -> TorchBackend:
        return _cpu_backend(loaded, TorchOptions("fp32", attention_kernel=kernel))

    with structlog.testing.capture_logs() as logs:
        second = build(None)
    assert second.attention_kernel
    assert all(isinstance(layer.self_attn, KernelAttention) for layer in second._decoder.detr_encoder.layers)
    assert any(e["event"] == "rewrite already in place" and "attention" in e["what"] for e in logs)
    with pytest.raises(InputError, match=r"swapped for the kernel by another backend.*load the model"):
        build(False)


def test_the_service_gives_the_torch_backend_its_engine_directorys_cache(tiny_engines: Path) -> None:
    from sam3stream.runtime.loader import COMPILE_CACHE_DIR, open_backend

    backend = open_backend("torch", tiny_engines, "cpu", precision="fp32", compile_cache=True)
    assert backend.options.compile_cache == str(tiny_engines / COMPILE_CACHE_DIR)  # type: ignore[attr-defined]
    # Nothing compiles on the CPU, so nothing is read or written there.
    assert backend.save_compile_cache() == 0  # type: ignore[attr-defined]
    assert not (tiny_engines / COMPILE_CACHE_DIR).exists()
    plain = open_backend("torch", tiny_engines, "cpu", precision="fp32")
    assert plain.options.compile_cache is None  # type: ignore[attr-defined]


def test_a_restart_takes_the_start_up_choices_an_earlier_start_recorded(
    tmp_path: Path, tiny_tokenizer: Path
) -> None:
    """With a compile cache, the choices an earlier start timed are taken as recorded (a restart
    compiles what was saved); an explicit option still wins, and a choice the device cannot
    run (the attention kernel on the CPU) is not taken."""
    from sam3stream.runtime import compile_cache
    from sam3stream.runtime.fused_mlp import FusedMLP

    cache = tmp_path / "compile-cache"

    def build(fused_gelu: bool | None = None) -> TorchBackend:
        options = TorchOptions("fp32", fused_gelu=fused_gelu, compile_cache=str(cache))
        return _cpu_backend(_tiny_loaded(tiny_tokenizer), options)  # a model per backend: fusing rewrites it

    assert not build().fused_gelu
    assert not cache.exists()  # nothing was timed on the CPU, so nothing was recorded
    base = compile_cache.cache_base(
        cache,
        torch_version=torch.__version__,
        device="cpu",
        resolution=448,
        batch=1,
        vision_chunk=1,
        decoder_frames=1,
        precision="fp32",
    )
    record = compile_cache.choices_file(base)
    record.parent.mkdir(parents=True)
    assert compile_cache.save_choices(record, {"fused_gelu": True, "attention_kernel": True})
    restarted = build()
    assert restarted.fused_gelu and not restarted.attention_kernel
    assert all(isinstance(layer.mlp, FusedMLP) for layer in restarted._vision.backbone.layers)
    assert not build(fused_gelu=False).fused_gelu
    record.write_text("{truncated")
    with structlog.testing.capture_logs() as logs:
        assert not build().fused_gelu
    assert [e["path"] for e in logs if e["event"] == "compile_cache_choices_unusable"] == [str(record)]
