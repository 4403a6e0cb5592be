"""Checkpoint directories: loading at any resolution, the video layout, and clear errors."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import torch

from sam3stream.errors import CheckpointError, ResolutionError
from sam3stream.model.checkpoint import load_checkpoint, read_checkpoint_config


def test_written_at_one_resolution_loads_at_another(tiny_checkpoint: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["vision_config"]["backbone_config"]["image_size"] == 1008
    a = load_checkpoint(tiny_checkpoint, 448).model
    b = load_checkpoint(tiny_checkpoint, 672).model
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Only the global layers' RoPE positions differ (a non-persistent buffer built from the config).
    layers_a, layers_b = a.vision_encoder.backbone.layers, b.vision_encoder.backbone.layers
    glob = a.config.vision_config.backbone_config.global_attn_indexes
    assert layers_a[glob[0]].position_ids.shape[0] == 32 * 32
    assert layers_b[glob[0]].position_ids.shape[0] == 48 * 48
    with torch.no_grad():
        fpn = b.vision_encoder(torch.zeros(1, 3, 672, 672)).fpn_hidden_states
    assert fpn[2].shape[-1] == 48


def test_written_weights_are_as_readable_as_the_rest(tiny_checkpoint: Path) -> None:
    # A service running as another user must be able to read a checkpoint someone wrote.
    config_mode = stat.S_IMODE((tiny_checkpoint / "config.json").stat().st_mode)
    assert config_mode & stat.S_IROTH  # the tests' umask leaves files readable by others
    assert stat.S_IMODE((tiny_checkpoint / "model.safetensors").stat().st_mode) == config_mode


def test_video_config_nesting_and_prefixed_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    video = tmp_path / "video"
    shutil.copytree(tiny_checkpoint, video)
    plain = json.loads((video / "config.json").read_text())
    (video / "config.json").write_text(json.dumps({"model_type": "sam3_video", "detector_config": plain}))
    weights = load_file(str(video / "model.safetensors"))
    prefixed = {f"detector_model.{k}": v for k, v in weights.items()}
    prefixed["tracker_model.some.weight"] = torch.zeros(2)
    save_file(prefixed, str(video / "model.safetensors"))
    loaded = load_checkpoint(video, 448).model
    reference = load_checkpoint(tiny_checkpoint, 448).model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_missing_directory_and_files(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", 448)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a file; give the folder that holds it"):
        load_checkpoint(tiny_checkpoint / "model.safetensors", 448)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_checkpoint(broken, 448)
    shutil.copy2(tiny_checkpoint / "model.safetensors", broken / "model.safetensors")
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(broken, 448)


def test_corrupt_files(tmp_path: Path, tiny_checkpoint: Path) -> None:
    broken = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(broken, 448)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint_config(broken)


def test_weights_that_do_not_fit_the_config(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights[next(k for k in weights if k.startswith("detr_decoder."))]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="weights missing"):
        load_checkpoint(broken, 448)


@pytest.mark.parametrize(
    ("value", "nearest"), [(1000, "994 or 1008"), (300, "448"), (1400, "1344"), (455, "448 or 462")]
)
def test_invalid_resolution_names_value_and_nearest(tiny_checkpoint: Path, value: int, nearest: str) -> None:
    with pytest.raises(ResolutionError, match=f"{value} is not a valid.*nearest valid: {nearest}"):
        load_checkpoint(tiny_checkpoint, value)
