"""The tiny CLIP tokenizer files, and runtime PromptTokenizer parity with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import structlog

from sam3stream.errors import CheckpointError, InputError
from sam3stream.model.tokenizer_files import (
    BOS_TOKEN,
    EOS_TOKEN,
    TINY_TOKENIZER_FILES,
    WORDS,
    write_tiny_tokenizer,
)
from sam3stream.runtime.tokenize import PromptTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(out)
    return out


def _words(n: int) -> str:
    return " ".join(["person"] * n)


# 30 whole-word tokens + start + end = exactly 32; 31 words = 33 tokens.
EXACT_32 = _words(30)
PROMPTS_FIT = [
    "person",
    "blow gun",
    "A Person holding a BLOW GUN!!",
    "red car, blue truck; (dog) & cat?",
    "  counter \t\n shelf  ",
    "Ünïcödé çafé",
    "猫 and 🐈 on the shelf",
    "x-ray 3d 42 tools",
    "it's the worker's box",
    EXACT_32,
]
PROMPTS_LONG = [
    _words(31),
    "a very long prompt about a person holding a blow gun near the counter with many boxes on the shelf "
    "and a dog and a cat walking on the floor next to a red car",
    "🐈" * 40,
]


def test_files_and_sizes(tok_dir: Path) -> None:
    for name in TINY_TOKENIZER_FILES:
        assert (tok_dir / name).is_file(), name
    size = write_tiny_tokenizer(tok_dir / "again")
    assert 514 < size <= 1280
    tok = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == size
    assert tok.token_to_id(BOS_TOKEN) == size - 2
    assert tok.token_to_id(EOS_TOKEN) == size - 1
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == size and sorted(vocab.values()) == list(range(size))
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "CLIPTokenizer"
    assert config["model_max_length"] == 32


def test_loads_with_tokenizers_and_transformers(tok_dir: Path) -> None:
    tok = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert type(auto).__name__ == "CLIPTokenizer"
    assert auto.pad_token_id == auto.eos_token_id == tok.token_to_id(EOS_TOKEN)
    assert auto.bos_token_id == tok.token_to_id(BOS_TOKEN)
    for prompt in PROMPTS_FIT:
        assert auto(prompt)["input_ids"] == tok.encode(prompt).ids


def test_built_in_words_are_single_tokens(tok_dir: Path) -> None:
    tok = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for phrase in WORDS:
        ids = tok.encode(phrase).ids
        assert len(ids) == 2 + len(phrase.split()), phrase
    unk = tok.token_to_id(EOS_TOKEN)
    # Any text tokenizes without falling back to unk (the end-of-text id).
    assert unk not in tok.encode("Ωmega ∑ 😀 \x00 zzzqqq").ids[1:-1]


def test_encode_matches_transformers(tok_dir: Path) -> None:
    auto = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    runtime = PromptTokenizer(tok_dir)

    ids, mask = runtime.encode(PROMPTS_FIT)
    want = auto(PROMPTS_FIT, padding="max_length", max_length=32)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (len(PROMPTS_FIT), 32)
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"]))
    assert runtime.last_truncated == ()
    assert mask[PROMPTS_FIT.index(EXACT_32)].sum() == 32

    prompts = PROMPTS_FIT + PROMPTS_LONG
    result = runtime.encode_detailed(prompts)
    want = auto(prompts, padding="max_length", max_length=32, truncation=True)
    np.testing.assert_array_equal(result.input_ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(result.attention_mask, np.asarray(want["attention_mask"]))
    assert [t.index for t in result.truncated] == list(range(len(PROMPTS_FIT), len(prompts)))
    assert [t.prompt for t in result.truncated] == PROMPTS_LONG
    full = [len(auto(p)["input_ids"]) for p in PROMPTS_LONG]
    assert [t.tokens for t in result.truncated] == full
    assert all(n > 32 for n in full)
    # The end-of-text token stays last.
    assert (result.input_ids[len(PROMPTS_FIT) :, -1] == auto.eos_token_id).all()


def test_truncation_is_logged(tok_dir: Path) -> None:
    runtime = PromptTokenizer(tok_dir)
    with structlog.testing.capture_logs() as logs:
        runtime.encode(["dog", _words(40)])
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "truncated" in warnings[0]["event"]
    assert warnings[0]["prompt"] == _words(40)
    assert warnings[0]["tokens"] == 42
    assert [t.index for t in runtime.last_truncated] == [1]


@pytest.mark.parametrize("prompts", [[], [""], ["dog", "   "], ["\t\n"]])
def test_empty_prompts_are_input_errors(tok_dir: Path, prompts: list[str]) -> None:
    with pytest.raises(InputError):
        PromptTokenizer(tok_dir).encode(prompts)


def test_pad_token_from_config_and_fallback(tok_dir: Path, tmp_path: Path) -> None:
    only_json = tmp_path / "only"
    only_json.mkdir()
    (only_json / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    fallback = PromptTokenizer(only_json)
    assert fallback.pad_token == EOS_TOKEN
    np.testing.assert_array_equal(fallback.encode(["dog"])[0], PromptTokenizer(tok_dir).encode(["dog"])[0])

    # A different pad token named in tokenizer_config.json wins (special_tokens_map.json is the fallback).
    other = tmp_path / "other"
    other.mkdir()
    for name in TINY_TOKENIZER_FILES:
        (other / name).write_bytes((tok_dir / name).read_bytes())
    config = json.loads((other / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["pad_token"] = "!"
    (other / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    runtime = PromptTokenizer(other)
    ids, mask = runtime.encode(["dog"])
    bang = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json")).token_to_id("!")
    assert runtime.pad_token_id == bang
    assert (ids[0, 3:] == bang).all() and mask[0].tolist() == [1, 1, 1] + [0] * 29
    auto = transformers.AutoTokenizer.from_pretrained(str(other))
    np.testing.assert_array_equal(
        ids, np.asarray(auto(["dog"], padding="max_length", max_length=32)["input_ids"])
    )

    del config["pad_token"]
    (other / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    special = json.loads((other / "special_tokens_map.json").read_text(encoding="utf-8"))
    special["pad_token"] = {"content": "?", "normalized": False}
    (other / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    assert PromptTokenizer(other).pad_token == "?"


def test_missing_or_corrupt_files_are_checkpoint_errors(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        PromptTokenizer(tmp_path / "nowhere")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        PromptTokenizer(bad)

    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (bad_config / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json"):
        PromptTokenizer(bad_config)

    bad_pad = tmp_path / "bad_pad"
    bad_pad.mkdir()
    (bad_pad / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (bad_pad / "tokenizer_config.json").write_text('{"pad_token": "<pad>"}', encoding="utf-8")
    with pytest.raises(CheckpointError, match="pad token"):
        PromptTokenizer(bad_pad)


def test_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert write_tiny_tokenizer(a) == write_tiny_tokenizer(b)
    for name in TINY_TOKENIZER_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_smaller_vocab(tmp_path: Path) -> None:
    size = write_tiny_tokenizer(tmp_path, vocab_size=600)
    assert size == 600
    runtime = PromptTokenizer(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    # With fewer merges words split into pieces, so some of these now exceed 32 tokens.
    prompts = PROMPTS_FIT + PROMPTS_LONG
    ids, _ = runtime.encode(prompts)
    want = auto(prompts, padding="max_length", max_length=32, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, np.asarray(want))
    assert len(runtime.last_truncated) > len(PROMPTS_LONG)
    with pytest.raises(ValueError):
        write_tiny_tokenizer(tmp_path / "x", vocab_size=100)


def test_left_padding_from_config(tok_dir: Path, tmp_path: Path) -> None:
    for name in TINY_TOKENIZER_FILES:
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["padding_side"] = "left"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ids, mask = PromptTokenizer(tmp_path).encode(PROMPTS_FIT)
    want = transformers.AutoTokenizer.from_pretrained(str(tmp_path))(
        PROMPTS_FIT, padding="max_length", max_length=32
    )
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"]))
    assert mask[0, -1] == 1 and mask[0, 0] == 0
