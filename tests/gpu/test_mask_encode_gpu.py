"""On a CUDA device: the device mask encoder's masks against the host encoder's, from the same
logits (CUDA's bilinear kernel rounds its own way: pixels within a few ulps of 0 may differ)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from sam3stream.runtime.mask_encode import encode_kept_masks  # noqa: E402
from tests.runtime.test_mask_encode import host_counts, pixels_differing  # noqa: E402
from tests.test_postprocess import MASKS  # noqa: E402


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (641, 359), (3840, 2160)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_masks_match_the_hosts(width: int, height: int, dtype: str) -> None:
    names = [n for n in MASKS if MASKS[n].shape == (288, 288)]
    logits = torch.from_numpy(np.stack([MASKS[n] for n in names]))
    # The backend's masks are bf16; the host encoder is given them as float32.
    block = logits.to(getattr(torch, dtype)).cuda()[None, None]
    index = torch.tensor([[0, 0, k] for k in range(len(names))], device="cuda")
    got = encode_kept_masks(block, index, [(width, height)])
    for k, name in enumerate(names):
        want = host_counts(block[0, 0, k].float().cpu().numpy(), width, height)
        assert got[k].sum() == width * height, name
        differ = pixels_differing(got[k], want, width, height)
        assert differ <= max(8, width * height // 100_000), (name, differ)


@pytest.mark.parametrize("deferred", [True, False])
def test_backend_encodes_while_the_next_batch_computes(
    deferred: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches submitted ahead (the worker's order) with ``mask_sizes``: each batch's masks are
    encoded after the next batch was queued (deferred, from a copy of their logits) or before
    (more than DEFERRED_MASKS kept), and either way match the logits that batch gave alone."""
    from sam3stream.model.build import random_model
    from sam3stream.model.roi_align import install_into_transformers
    from sam3stream.runtime import kept_masks
    from sam3stream.runtime import torch_backend as tb
    from tests.gpu.test_torch_backend_gpu import torch_backend

    if not deferred:
        monkeypatch.setattr(kept_masks, "DEFERRED_MASKS", 1)
    install_into_transformers()
    model = random_model("tiny", 448, seed=0, device="cuda")
    backend = torch_backend(model, "tiny", 448, 4, 20, tb.TorchOptions("fp32"))
    assert backend.encodes_masks
    text = backend.encode_text(["person", "hand"])
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, 256, (n, 448, 448, 3), dtype=np.uint8) for n in (4, 2, 4)]
    sizes = [[(640, 360), (64, 48), (640, 360), (97, 203)][: len(b)] for b in batches]
    alone = [backend.infer(b, text, 0.0) for b in batches]  # logits, one batch at a time
    pending = [backend.submit(b, text, 0.0, s) for b, s in zip(batches, sizes, strict=True)]
    for n, (p, want, frame_sizes) in enumerate(zip(pending, alone, sizes, strict=True)):
        got = p.result()
        np.testing.assert_array_equal(got.mask_index, want.mask_index)
        assert got.mask_counts is not None and len(got.mask_counts) == len(want.mask_index) > 1
        for row, (b, _, _) in enumerate(want.mask_index):
            w, h = frame_sizes[b]
            differ = pixels_differing(got.mask_counts[row], host_counts(want.masks[row], w, h), w, h)
            assert differ <= 8, (n, row)
    backend.close()


@pytest.mark.parametrize("deferred", [True, False])
def test_out_of_memory_while_encoding_returns_the_logits(
    deferred: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of device memory while encoding, deferred (on the copy stream, from the copied kept
    logits) or not: the batch comes back with its kept logits for the host, one warning each."""
    import structlog

    from sam3stream.model.build import random_model
    from sam3stream.model.roi_align import install_into_transformers
    from sam3stream.runtime import kept_masks
    from sam3stream.runtime import torch_backend as tb
    from tests.gpu.test_torch_backend_gpu import torch_backend

    def no_memory(*args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

    monkeypatch.setattr(kept_masks, "encode_masks" if deferred else "encode_kept_masks", no_memory)
    if not deferred:
        monkeypatch.setattr(kept_masks, "DEFERRED_MASKS", 1)
    install_into_transformers()
    model = random_model("tiny", 448, seed=0, device="cuda")
    backend = torch_backend(model, "tiny", 448, 2, 20, tb.TorchOptions("fp32"))
    text = backend.encode_text(["person", "hand"])
    frames = np.random.default_rng(6).integers(0, 256, (2, 448, 448, 3), dtype=np.uint8)
    plain = backend.infer(frames, text, 0.0)
    with structlog.testing.capture_logs() as logs:
        pending = [backend.submit(frames, text, 0.0, [(64, 48), (97, 203)]) for _ in range(2)]
        results = [p.result() for p in pending]
    warned = [e for e in logs if e["event"] == "mask_encoding_out_of_memory"]
    assert len(warned) == 2 and all(e["masks"] == len(plain.masks) > 1 for e in warned)
    for got in results:
        assert got.mask_counts is None
        np.testing.assert_array_equal(got.mask_index, plain.mask_index)
        np.testing.assert_array_equal(got.masks, plain.masks)
    backend.close()
