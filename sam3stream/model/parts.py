"""SAM 3 split into four graphs with plain-tensor inputs and outputs.

- :class:`VisionEncoder`  frames [B, R, R, 3] uint8 -> FPN levels at 4x, 2x, 1x of the patch grid
- :class:`TextEncoder`    token ids + mask [C, 32] -> prompt features [C, 32, D]
- :class:`GeometryEncoder` 1x level + box exemplars -> geometry prompt tokens (CLS included)
- :class:`Decoder`        FPN of B frames x prompts of C classes -> top-K per frame and class

The parts reuse the submodules (and so the weights) of transformers' ``Sam3Model``; only the
glue is written here. Composed, they reproduce ``Sam3Model.forward`` with one padding box,
which is what Meta's reference does for text-only prompts (the geometry encoder's CLS token
is part of every prompt there; transformers drops it when no box is given).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sam3stream.errors import InputError
from sam3stream.runtime.contract import PAD_BOX_LABEL

if TYPE_CHECKING:
    from transformers import Sam3Model

__all__ = [
    "PAD_BOX_LABEL",
    "Decoder",
    "GeometryEncoder",
    "Parts",
    "TextEncoder",
    "VisionEncoder",
    "padding_boxes",
    "split_model",
]


def padding_boxes(batch: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One padding box per frame: makes the geometry encoder emit only its CLS token."""
    boxes = torch.zeros(batch, 1, 4, device=device)
    labels = torch.full((batch, 1), PAD_BOX_LABEL, dtype=torch.long, device=device)
    return boxes, labels


class VisionEncoder(nn.Module):
    """ViT + the three FPN levels used downstream (the 0.5x level is never computed)."""

    def __init__(self, model: Sam3Model) -> None:
        super().__init__()
        vision: Any = model.vision_encoder  # its sub-configs are typed dict | PreTrainedConfig | None
        self.backbone = vision.backbone
        self.fpn_layers = nn.ModuleList(list(vision.neck.fpn_layers)[:3])
        self.patch = int(vision.config.backbone_config.patch_size)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # uint8 RGB in, normalisation inside the graph: (x / 255 - 0.5) / 0.5, as Sam3Processor does.
        # Cast before the permute: TensorRT's ONNX parser refuses uint8 intermediate tensors.
        proj1: Any = self.fpn_layers[0].proj1  # nn.Module.__getattr__ is typed Tensor | Module
        dtype = proj1.weight.dtype
        pixels = frames.to(dtype).permute(0, 3, 1, 2) * (1.0 / 127.5) - 1.0
        hidden = self.backbone(pixels).last_hidden_state
        batch, grid = pixels.shape[0], pixels.shape[-1] // self.patch
        spatial = hidden.view(batch, grid, grid, -1).permute(0, 3, 1, 2)
        fpn0, fpn1, fpn2 = (layer(spatial) for layer in self.fpn_layers)
        return fpn0, fpn1, fpn2


class TextEncoder(nn.Module):
    """CLIP text encoder + projection to the DETR width. Independent of the resolution."""

    def __init__(self, model: Sam3Model) -> None:
        super().__init__()
        self.text_encoder = model.text_encoder
        self.text_projection = model.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        projected: torch.Tensor = self.text_projection(out.last_hidden_state)
        return projected


class GeometryEncoder(nn.Module):
    """Box exemplars (normalized cxcywh, label 1/0, or -10 for padding) -> prompt tokens.

    Runs per frame, not per class: with only padding boxes its output (the CLS token after
    cross-attending to the image) does not depend on the text. This is
    Sam3GeometryEncoder.forward on its own submodules, with two changes that keep the batch
    axis dynamic in exported graphs: RoIAlign takes the boxes as one [B, N, 4] tensor (not a
    per-image list, whose length the exporter would freeze) and runs in plain torch.
    """

    def __init__(self, model: Sam3Model) -> None:
        super().__init__()
        self.geo = model.geometry_encoder
        # nn.Module, not the transformers class: the torch backend swaps in a precomputed table.
        self.position_encoding: nn.Module = model.vision_encoder.neck.position_encoding

    def forward(
        self, fpn2: torch.Tensor, boxes: torch.Tensor, box_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask
        from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, concat_padded_sequences

        from sam3stream.model.roi_align import roi_align

        geo = self.geo
        batch, num_boxes = boxes.shape[0], boxes.shape[1]
        boxes = boxes.to(fpn2.dtype)
        box_mask = box_labels != PAD_BOX_LABEL
        labels = torch.where(box_mask, box_labels, torch.zeros_like(box_labels))
        pos2 = self.position_encoding(fpn2.shape, fpn2.device, fpn2.dtype)
        vision_flat = fpn2.flatten(2).transpose(1, 2)
        pos_flat = pos2.flatten(2).transpose(1, 2)
        normed = geo.vision_layer_norm(fpn2.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

        # Sam3GeometryEncoder._encode_boxes
        height, width = normed.shape[-2:]
        embed = geo.boxes_direct_project(boxes)
        scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        pooled = roi_align(normed, box_cxcywh_to_xyxy(boxes) * scale, geo.roi_size)  # type: ignore[no-untyped-call]  # unannotated in transformers
        embed = embed + geo.boxes_pool_project(pooled).view(batch, num_boxes, geo.hidden_size)
        cx, cy, w, h = boxes.unbind(-1)
        pos = geo._encode_box_coordinates(cx.flatten(), cy.flatten(), w.flatten(), h.flatten())
        embed = embed + geo.boxes_pos_enc_project(pos.view(batch, num_boxes, pos.shape[-1]))
        embed = geo.label_embed(labels.long()) + embed

        cls = geo.cls_embed.weight.view(1, 1, geo.hidden_size).expand(batch, -1, -1)
        cls_mask = torch.ones(batch, 1, dtype=box_mask.dtype, device=box_mask.device)
        prompt, prompt_mask = concat_padded_sequences(embed, box_mask, cls, cls_mask)
        prompt = geo.prompt_layer_norm(geo.final_proj(prompt))
        attn_mask = create_bidirectional_mask(
            config=geo.config, inputs_embeds=prompt, attention_mask=prompt_mask
        )
        for layer in geo.layers:
            prompt = layer(
                prompt_feats=prompt,
                vision_feats=vision_flat,
                vision_pos_encoding=pos_flat,
                prompt_mask=attn_mask,
            )
        return geo.output_layer_norm(prompt), prompt_mask


class Decoder(nn.Module):
    """DETR encoder + decoder, scoring, top-K, then masks for the K kept queries only.

    Frames x classes run in one call, frame-major (row b * C + c). Ranking by
    sigmoid(logit) * sigmoid(presence) equals ranking by logit within a (frame, class), so
    the K rows are exactly the K best of the full model's queries; the mask head (the costly
    part: a dot product per query over a 4x-grid map) then runs on K instead of all queries.
    """

    def __init__(self, model: Sam3Model, queries: int) -> None:
        super().__init__()
        detr_config: Any = model.config.detr_decoder_config  # typed dict | PreTrainedConfig | None
        total = int(detr_config.num_queries)
        if not 1 <= queries <= total:
            raise InputError(f"queries must be between 1 and {total} (the decoder's queries), got {queries}")
        self.queries = queries
        # nn.Module, not the transformers class: the torch backend swaps in a precomputed table.
        self.position_encoding: nn.Module = model.vision_encoder.neck.position_encoding
        self.detr_encoder = model.detr_encoder
        self.detr_decoder = model.detr_decoder
        self.scoring = model.dot_product_scoring
        mask = model.mask_decoder
        self.pixel_decoder = mask.pixel_decoder
        self.mask_embedder = mask.mask_embedder
        self.instance_projection = mask.instance_projection
        self.prompt_cross_attn = mask.prompt_cross_attn
        self.prompt_cross_attn_norm = mask.prompt_cross_attn_norm
        self.mask_config = mask.config

    def forward(
        self,
        fpn0: torch.Tensor,
        fpn1: torch.Tensor,
        fpn2: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        geo_features: torch.Tensor,
        geo_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask
        from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy

        frames, classes = fpn2.shape[0], text_features.shape[0]
        rows = frames * classes
        dim, height, width = fpn2.shape[1], fpn2.shape[2], fpn2.shape[3]

        def per_row(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B*C, ...], frame-major
            return x.unsqueeze(1).expand(frames, classes, *x.shape[1:]).reshape(rows, *x.shape[1:])

        prompt = torch.cat([text_features.to(fpn2.dtype).repeat(frames, 1, 1), per_row(geo_features)], dim=1)
        prompt_mask = torch.cat([text_mask.bool().repeat(frames, 1), per_row(geo_mask.bool())], dim=1)
        encoded, pos = self._encode(fpn2, prompt, prompt_mask, per_row)
        hidden, boxes_cxcywh, presence_logit = self._decode_queries(
            encoded, prompt, pos, prompt_mask, height, width
        )
        boxes = box_cxcywh_to_xyxy(boxes_cxcywh)  # type: ignore[no-untyped-call]  # unannotated in transformers
        qdtype = hidden.dtype
        logits = self.scoring(
            decoder_hidden_states=hidden.unsqueeze(0),
            text_features=prompt.to(qdtype),
            text_mask=prompt_mask,
        )[0, :, :, 0]
        presence = presence_logit.float().sigmoid()  # [rows, 1]
        scores = logits.float().sigmoid() * presence

        top_scores, top_index = scores.topk(self.queries, dim=1)  # sorted, best first
        top_boxes = boxes.gather(1, top_index.unsqueeze(-1).expand(-1, -1, 4))
        top_hidden = hidden.gather(1, top_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])).to(fpn2.dtype)

        # Mask head (Sam3MaskDecoder.forward without the unused semantic map), on K queries.
        normed = self.prompt_cross_attn_norm(encoded)
        cross_mask = create_bidirectional_mask(
            config=self.mask_config,
            inputs_embeds=normed,
            encoder_hidden_states=prompt,
            attention_mask=prompt_mask,
        )
        attn, _ = self.prompt_cross_attn(query=normed, key=prompt, value=prompt, attention_mask=cross_mask)
        encoded = encoded + attn
        visual = encoded[:, : height * width].transpose(1, 2).reshape(rows, dim, height, width)
        pixel = self._pixel_decoder(visual, fpn1, fpn0, frames, classes)
        instance = self.instance_projection(pixel)
        masks = torch.einsum("rqc,rchw->rqhw", self.mask_embedder(top_hidden), instance)

        size = masks.shape[-1]
        return (
            top_scores.view(frames, classes, self.queries),
            top_boxes.view(frames, classes, self.queries, 4),
            masks.view(frames, classes, self.queries, size, size),
            presence.view(frames, classes),
            top_index.view(frames, classes, self.queries),
        )

    def _encode(
        self,
        fpn2: torch.Tensor,
        prompt: torch.Tensor,
        prompt_mask: torch.Tensor,
        per_row: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sam3DetrEncoder.forward on the 1x level, with the first layer's self-attention run once
        per frame instead of once per (frame, class): the prompt only enters through the
        cross-attention after it, so every class of a frame would compute the same attention.

        Returns the encoded tokens [rows, H*W, D] and their position encoding (broadcast rows).
        """
        from transformers.masking_utils import create_bidirectional_mask

        enc: Any = self.detr_encoder
        rows = prompt.shape[0]
        pos = self.position_encoding(fpn2[:1].shape, fpn2.device, fpn2.dtype).flatten(2).transpose(1, 2)
        vision = fpn2.flatten(2).transpose(1, 2)  # [B, H*W, D]
        first, rest = enc.layers[0], enc.layers[1:]
        normed = first.layer_norm1(vision)
        with_pos = normed + pos
        attn, _ = first.self_attn(query=with_pos, key=with_pos, value=normed)
        hidden = per_row(attn + vision)  # dropout is the identity in eval
        pos_rows = pos.expand(rows, -1, -1)
        cross_mask = create_bidirectional_mask(
            config=enc.config, inputs_embeds=hidden, attention_mask=prompt_mask, encoder_hidden_states=prompt
        )
        # The rest of the first layer (Sam3DetrEncoderLayer.forward after its self-attention).
        attn, _ = first.cross_attn(
            query=first.layer_norm2(hidden), key=prompt, value=prompt, attention_mask=cross_mask
        )
        hidden = hidden + attn
        hidden = hidden + first.mlp(first.layer_norm3(hidden))
        for layer in rest:
            hidden = layer(
                hidden, prompt_feats=prompt, vision_pos_encoding=pos_rows, prompt_cross_attn_mask=cross_mask
            )
        return hidden, pos_rows

    def _decode_queries(
        self,
        vision: torch.Tensor,
        text: torch.Tensor,
        vision_pos: torch.Tensor,
        text_mask: torch.Tensor,
        height: int,
        width: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sam3DetrDecoder.forward, keeping only the last layer's outputs, with the box refinement
        always in float32: bf16 cannot place a box coordinate near 1 closer than 2^-8 (4 px at
        1008), and the boxes are refined through every layer. The attention runs at the
        decoder's own dtype. In float32 this is exactly transformers' computation.

        Returns the last layer's normalised query states [rows, Q, D], the boxes (cxcywh,
        float32) and the presence logit [rows, 1].
        """
        from transformers.masking_utils import create_bidirectional_mask
        from transformers.models.sam3.modeling_sam3 import inverse_sigmoid

        dd: Any = self.detr_decoder
        dtype = dd.query_embed.weight.dtype
        vision, text, vision_pos = vision.to(dtype), text.to(dtype), vision_pos.to(dtype)
        rows = vision.shape[0]
        queries = dd.query_embed.weight.unsqueeze(0).expand(rows, -1, -1)
        boxes = dd.reference_points.weight.float().unsqueeze(0).expand(rows, -1, -1).sigmoid()
        presence_token = dd.presence_token.weight.unsqueeze(0).expand(rows, -1, -1)
        hidden = torch.cat([presence_token, queries], dim=1)
        text_attn = create_bidirectional_mask(
            config=dd.config, inputs_embeds=hidden, attention_mask=text_mask, encoder_hidden_states=text
        )
        normed = hidden[:, 1:]
        for layer in dd.layers:
            query_pos = dd.ref_point_head(dd.position_encoding.encode_boxes(boxes).to(dtype))
            # Box relative-position bias; the presence token (row 0) attends to every location.
            rpb = dd._get_rpb_matrix(boxes.to(dtype), (height, width))
            hidden = layer(
                hidden,
                query_pos=query_pos,
                text_features=text,
                vision_features=vision,
                vision_pos_encoding=vision_pos,
                text_cross_attn_mask=text_attn,
                vision_cross_attn_mask=F.pad(rpb, (0, 0, 1, 0), mode="constant", value=0),
            )
            normed = dd.output_layer_norm(hidden[:, 1:])
            boxes = (dd.box_head(normed).float() + inverse_sigmoid(boxes)).sigmoid()
        limit = dd.clamp_presence_logit_max_val
        presence = (
            dd.presence_head(dd.presence_layer_norm(hidden[:, :1])).squeeze(-1).clamp(min=-limit, max=limit)
        )
        return normed, boxes, presence

    def _pixel_decoder(
        self, coarse: torch.Tensor, fpn1: torch.Tensor, fpn0: torch.Tensor, frames: int, classes: int
    ) -> torch.Tensor:
        """Sam3PixelDecoder.forward, adding each frame's skip feature by broadcasting over classes
        instead of materialising C copies of the large 4x and 2x levels."""
        prev = coarse
        for index, skip in enumerate((fpn1, fpn0)):
            prev = F.interpolate(prev, size=skip.shape[-2:], mode="nearest")
            shape = prev.shape
            prev = (prev.view(frames, classes, *shape[1:]) + skip.unsqueeze(1)).view(shape)
            prev = F.relu(self.pixel_decoder.norms[index](self.pixel_decoder.conv_layers[index](prev)))
        return prev


class Parts(nn.Module):
    """The four parts of one model, sharing its weights."""

    def __init__(self, model: Sam3Model, queries: int) -> None:
        super().__init__()
        self.vision = VisionEncoder(model)
        self.text = TextEncoder(model)
        self.geometry = GeometryEncoder(model)
        self.decoder = Decoder(model, queries)


def split_model(model: Sam3Model, queries: int = 50) -> Parts:
    return Parts(model, queries).eval()
