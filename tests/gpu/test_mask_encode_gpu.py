"""On a CUDA device: the device mask encoder's masks against the host encoder's, from the same
logits (CUDA's bilinear kernel rounds its own way: pixels within a few ulps of 0 may differ)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from sam3stream.postprocess import _mask_counts  # noqa: E402
from sam3stream.rle import counts_to_string, decode  # noqa: E402
from sam3stream.runtime.mask_encode import encode_kept_masks  # noqa: E402
from sam3stream.stream.frames import Rle  # noqa: E402
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
        source = block[0, 0, k].float().cpu().numpy()
        with np.errstate(invalid="ignore", over="ignore"):
            want = _mask_counts(source, width, height)
        assert got[k].sum() == width * height, name
        ours = decode(Rle(size=(height, width), counts=counts_to_string(got[k])))
        theirs = decode(Rle(size=(height, width), counts=counts_to_string(want)))
        differ = int(np.count_nonzero(ours != theirs))
        assert differ <= max(8, width * height // 100_000), (name, differ)


@pytest.mark.parametrize("deferred", [True, False])
def test_backend_encodes_while_the_next_batch_computes(
    deferred: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches submitted ahead (the worker's order) with ``mask_sizes``: each batch's masks are
    encoded after the next batch was queued (deferred, from a copy of their logits) or before
    (more than DEFERRED_MASKS kept), and either way match the logits that batch gave alone."""
    import tempfile
    from pathlib import Path

    from sam3stream.model.build import random_model
    from sam3stream.model.checkpoint import LoadedModel
    from sam3stream.model.roi_align import install_into_transformers
    from sam3stream.model.tokenizer_files import write_tiny_tokenizer
    from sam3stream.runtime import torch_backend as tb

    if not deferred:
        monkeypatch.setattr(tb, "DEFERRED_MASKS", 1)
    install_into_transformers()
    tok = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tok)
    loaded = LoadedModel(
        model=random_model("tiny", 448, seed=0, device="cuda"),
        tokenizer_dir=tok,
        checkpoint_sha256="random",
        source="random:tiny:seed=0",
    )
    backend = tb.TorchBackend.from_model(
        loaded, resolution=448, batch=4, queries=20, options=tb.TorchOptions("fp32")
    )
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
            host = _mask_counts(want.masks[row], w, h)
            ours = decode(Rle(size=(h, w), counts=counts_to_string(got.mask_counts[row])))
            theirs = decode(Rle(size=(h, w), counts=counts_to_string(host)))
            assert int(np.count_nonzero(ours != theirs)) <= 8, (n, row)
    backend.close()
