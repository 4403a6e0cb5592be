"""SAM 3 configurations per named size and resolution; seeded random models.

Resolution is a configuration matter in transformers' SAM 3: the RoPE tables of the
global attention layers and the FPN sizes derive from ``image_size``; no weight depends
on it. So a model built for R loads any checkpoint unchanged.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from sam3stream.resolution import PATCH, check_resolution

if TYPE_CHECKING:
    from transformers import Sam3Config, Sam3Model

__all__ = ["SIZES", "TEXT_CONTEXT", "config_for_size", "random_model", "set_resolution"]

TEXT_CONTEXT = 32
# CLIP's vocabulary; the tiny model keeps it so any CLIP tokenizer's ids fit.
CLIP_VOCAB = 49408
CLIP_BOS, CLIP_EOS = 49406, 49407

# "tiny" keeps the real structure (windowed + global RoPE attention, a window that forces
# padding at most resolutions, FPN at 4x/2x/1x/0.5x, geometry encoder, DETR, mask head) at
# widths small enough for CPU tests. Window 8 means grids 32 (448) and 40 (560) need no
# padding while 35 (490) and 48+ that are not multiples of 8 do.
_TINY: dict[str, Any] = {
    "vision_config": {
        "backbone_config": {
            "model_type": "sam3_vit_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "window_size": 8,
            "global_attn_indexes": [1, 3],
            "pretrain_image_size": 8 * PATCH,
        },
        "fpn_hidden_size": 32,
    },
    "text_config": {
        "vocab_size": CLIP_VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": TEXT_CONTEXT,
        "bos_token_id": CLIP_BOS,
        "eos_token_id": CLIP_EOS,
        "pad_token_id": CLIP_EOS,
    },
    "geometry_encoder_config": {
        "hidden_size": 32,
        "num_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    },
    "detr_encoder_config": {
        "hidden_size": 32,
        "num_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    },
    "detr_decoder_config": {
        "hidden_size": 32,
        "num_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    },
    "mask_decoder_config": {"hidden_size": 32, "num_attention_heads": 4},
}

SIZES = ("tiny", "full")


def set_resolution(config: Sam3Config, resolution: int) -> Sam3Config:
    """A copy of ``config`` built for ``resolution`` (RoPE grid and FPN sizes follow)."""
    check_resolution(resolution)
    config = copy.deepcopy(config)
    grid = resolution // PATCH
    vision_config: Any = config.vision_config  # typed dict | PreTrainedConfig | None
    vision_config.backbone_config.image_size = resolution
    vision_config.backbone_feature_sizes = [[4 * grid] * 2, [2 * grid] * 2, [grid] * 2]
    return config


def config_for_size(size: str, resolution: int) -> Sam3Config:
    from transformers import Sam3Config

    if size == "tiny":
        config = Sam3Config(**copy.deepcopy(_TINY))
    elif size == "full":
        config = Sam3Config()
    else:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    return set_resolution(config, resolution)


def random_model(size: str, resolution: int, seed: int = 0, device: str = "cpu") -> Sam3Model:
    """A randomly initialised SAM 3 of a named size; the same seed gives the same weights.

    ``device`` only says where the initialisation runs (a full model initialises in seconds
    on a GPU and in tens of seconds on a CPU); the weights then differ from a CPU init.
    """
    import torch
    from transformers import Sam3Model

    config = config_for_size(size, resolution)
    config._attn_implementation = "sdpa"
    devices = [torch.device(device)] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = Sam3Model(config)
    return model.eval()  # type: ignore[no-any-return,no-untyped-call]  # PreTrainedModel.eval is unannotated
