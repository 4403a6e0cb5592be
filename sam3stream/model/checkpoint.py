"""Checkpoint directories in the Hugging Face layout of ``facebook/sam3``.

A directory holds ``config.json`` (either a plain ``sam3`` config or a ``sam3_video``
config that nests it under ``detector_config``), ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and the CLIP tokenizer files.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from sam3stream.errors import CheckpointError
from sam3stream.model.build import random_model, set_resolution
from sam3stream.resolution import check_resolution
from sam3stream.runtime.manifest import ModelSpec

if TYPE_CHECKING:
    from transformers import Sam3Config, Sam3Model

__all__ = [
    "LoadedModel",
    "load_checkpoint",
    "read_checkpoint_config",
    "weight_files",
    "weights_sha256",
    "write_random_checkpoint",
]

log = structlog.get_logger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"


@dataclass
class LoadedModel:
    model: Sam3Model
    tokenizer_dir: Path
    checkpoint_sha256: str
    source: str

    def spec(self) -> ModelSpec:
        """What an engine manifest records about these weights."""
        config: Any = self.model.config  # sub-configs are typed dict | PreTrainedConfig | None
        return ModelSpec(
            source=self.source,
            checkpoint_sha256=self.checkpoint_sha256,
            hidden_size=int(config.detr_encoder_config.hidden_size),
            text_context=int(config.text_config.max_position_embeddings),
            num_queries=int(config.detr_decoder_config.num_queries),
        )


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    single = ckpt / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = ckpt / INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: corrupt shard index ({exc})") from None
        missing = [s for s in shards if not (ckpt / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{ckpt}: weight shards listed in {INDEX_NAME} are missing: {', '.join(missing)}"
            )
        return [ckpt / s for s in shards]
    raise CheckpointError(
        f"{ckpt}: no {WEIGHTS_NAME} (nor {INDEX_NAME}) found: not a SAM 3 checkpoint directory"
    )


def weights_sha256(ckpt: Path) -> str:
    """Hash of the weight files: identifies the weights whatever resolution they are built for."""
    digest = hashlib.sha256()
    for path in weight_files(ckpt):
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint_config(ckpt: Path) -> Sam3Config:
    """The detector config of a checkpoint (plain ``sam3`` or nested in ``sam3_video``)."""
    from transformers import Sam3Config

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        what = "is a file; give the folder that holds it" if ckpt.is_file() else "does not exist"
        raise CheckpointError(f"checkpoint directory {ckpt} {what}")
    path = ckpt / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: {CONFIG_NAME} is missing")
    try:
        raw: Any = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if isinstance(raw.get("detector_config"), dict):
        raw = raw["detector_config"]
    model_type = raw.get("model_type")
    if model_type not in (None, "sam3"):
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a SAM 3 (sam3 / sam3_video) config")
    raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        return Sam3Config(**raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid SAM 3 config ({exc})") from None


def _check_tokenizer(ckpt: Path) -> None:
    if not (ckpt / TOKENIZER_NAME).is_file():
        raise CheckpointError(
            f"{ckpt}: {TOKENIZER_NAME} is missing (the CLIP tokenizer files belong in the checkpoint)"
        )


def load_checkpoint(ckpt: Path, resolution: int) -> LoadedModel:
    """Load a checkpoint directory into a float32 ``Sam3Model`` built for ``resolution``."""
    import torch
    from safetensors import SafetensorError, safe_open
    from transformers import Sam3Model

    check_resolution(resolution)
    ckpt = Path(ckpt)
    config = set_resolution(read_checkpoint_config(ckpt), resolution)
    files = weight_files(ckpt)
    _check_tokenizer(ckpt)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    state[key] = fh.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({exc})") from None
    # A sam3_video checkpoint prefixes the detector with "detector_model." and adds a tracker.
    if any(k.startswith("detector_model.") for k in state):
        state = {
            k.removeprefix("detector_model."): v for k, v in state.items() if k.startswith("detector_model.")
        }
    config._attn_implementation = "sdpa"
    model = Sam3Model(config)  # random init is overwritten below; buffers (RoPE) come from the config
    expected = set(model.state_dict().keys())
    missing = sorted(expected - state.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{ckpt}: weights missing from the checkpoint: {shown}")
    unexpected = sorted(
        k for k in state.keys() - expected if not k.startswith(("tracker_model.", "tracker_neck."))
    )
    if unexpected:
        log.warning(
            "checkpoint has unused weights", checkpoint=str(ckpt), count=len(unexpected), first=unexpected[0]
        )
    try:
        model.load_state_dict({k: state[k] for k in expected}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt}: weights do not fit the config ({str(exc).splitlines()[0]})") from None
    model = model.float().eval()  # type: ignore[no-untyped-call]  # PreTrainedModel.float is unannotated
    return LoadedModel(
        model=model, tokenizer_dir=ckpt, checkpoint_sha256=weights_sha256(ckpt), source=str(ckpt)
    )


def write_random_checkpoint(size: str, out: Path, seed: int = 0, resolution: int = 1008) -> Path:
    """Write a randomly initialised checkpoint in the ``facebook/sam3`` layout, tokenizer included."""
    from sam3stream.model.tokenizer_files import write_tiny_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = random_model(size, resolution, seed)
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained leaves the weights 0600 (a private temporary file, renamed), unlike its
    # config.json: give them the config's mode, so that a service running as another user can
    # read the checkpoint.
    mode = stat.S_IMODE((out / "config.json").stat().st_mode)
    for weights in out.glob("*.safetensors"):
        weights.chmod(mode)
    write_tiny_tokenizer(out)
    log.info("wrote random checkpoint", size=size, seed=seed, out=str(out))
    return out
