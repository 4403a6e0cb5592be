"""The composed parts reproduce transformers' Sam3Model (with one padding box) on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sam3stream.model.checkpoint import load_checkpoint
from sam3stream.model.parts import padding_boxes, split_model

B, C, K = 2, 3, 20


def _inputs(resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(resolution)
    frames = torch.randint(0, 256, (B, resolution, resolution, 3), dtype=torch.uint8, generator=gen)
    ids = torch.randint(0, 49406, (C, 32), generator=gen)
    mask = torch.zeros(C, 32, dtype=torch.long)
    for c, length in enumerate((4, 7, 12)):
        mask[c, :length] = 1
    return frames, ids, mask


def _pixels(frames: torch.Tensor) -> torch.Tensor:
    # Sam3Processor: rescale to 0..1, then normalize with mean = std = 0.5.
    return (frames.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def _run_parts(parts, frames, ids, mask):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        fpn0, fpn1, fpn2 = parts.vision(frames)
        text = parts.text(ids, mask)
        boxes, labels = padding_boxes(frames.shape[0])
        geo, geo_mask = parts.geometry(fpn2, boxes, labels)
        return parts.decoder(fpn0, fpn1, fpn2, text, mask.bool(), geo, geo_mask)


# 448: grid 32, a multiple of the tiny window (8); 490: grid 35, padded to 40; 574: grid 41, padded to 48.
@pytest.mark.parametrize("resolution", [448, 490, 574])
def test_parts_match_full_model_with_padding_box(tiny_checkpoint: Path, resolution: int) -> None:
    model = load_checkpoint(tiny_checkpoint, resolution).model
    parts = split_model(model, K)
    frames, ids, mask = _inputs(resolution)
    scores, boxes, masks, presence, index = _run_parts(parts, frames, ids, mask)
    grid = resolution // 14
    assert masks.shape == (B, C, K, 4 * grid, 4 * grid)
    pixels = _pixels(frames)
    with torch.no_grad():
        for b in range(B):
            for c in range(C):
                out = model(
                    pixel_values=pixels[b : b + 1],
                    input_ids=ids[c : c + 1],
                    attention_mask=mask[c : c + 1],
                    input_boxes=torch.zeros(1, 1, 4),
                    input_boxes_labels=torch.full((1, 1), -10),
                )
                full = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid())[0]
                # The parts' rows are the model's queries at their reported indices ...
                rows = index[b, c]
                torch.testing.assert_close(scores[b, c], full[rows], atol=1e-4, rtol=0)
                torch.testing.assert_close(boxes[b, c], out.pred_boxes[0, rows], atol=1e-4, rtol=0)
                torch.testing.assert_close(masks[b, c], out.pred_masks[0, rows], atol=1e-3, rtol=0)
                torch.testing.assert_close(
                    presence[b, c], out.presence_logits.sigmoid()[0, 0], atol=1e-4, rtol=0
                )
                # ... and they are the K best of all 200 queries, best first.
                best = full.topk(K).values
                torch.testing.assert_close(scores[b, c], best, atol=1e-6, rtol=0)


def test_text_only_scores_need_the_cls_token(tiny_checkpoint: Path) -> None:
    """transformers' no-box path drops the geometry CLS token; the parts keep it (Meta's behaviour)."""
    model = load_checkpoint(tiny_checkpoint, 448).model
    parts = split_model(model, K)
    frames, ids, mask = _inputs(448)
    scores, _, _, _, index = _run_parts(parts, frames[:1], ids[:1], mask[:1])
    with torch.no_grad():
        no_box = model(pixel_values=_pixels(frames[:1]), input_ids=ids[:1], attention_mask=mask[:1])
    no_box_scores = (no_box.pred_logits.sigmoid() * no_box.presence_logits.sigmoid())[0, index[0, 0]]
    assert (no_box_scores - scores[0, 0]).abs().max() > 1e-4


def test_top_k_is_the_best_k_of_all_queries(tiny_checkpoint: Path) -> None:
    model = load_checkpoint(tiny_checkpoint, 448).model
    frames, ids, mask = _inputs(448)
    all_q = split_model(model, 200)
    some = split_model(model, 7)
    s_all, b_all, m_all, _, i_all = _run_parts(all_q, frames, ids, mask)
    s_k, b_k, m_k, _, i_k = _run_parts(some, frames, ids, mask)
    torch.testing.assert_close(s_k, s_all[..., :7])
    assert torch.equal(i_k, i_all[..., :7])
    torch.testing.assert_close(b_k, b_all[..., :7, :])
    torch.testing.assert_close(m_k, m_all[..., :7, :, :], atol=1e-5, rtol=0)
    # Every query left out scores no higher than the K-th kept one.
    assert (s_all[..., 7:] <= s_k[..., -1:]).all()
