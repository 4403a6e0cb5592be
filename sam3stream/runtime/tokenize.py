"""Prompt tokenization at run time, from the checkpoint's tokenizer.json alone.

Gives the same ids and attention mask as ``Sam3Processor`` (transformers' CLIP tokenizer called with
``padding="max_length", max_length=32``) using only the ``tokenizers`` library, so the runtime needs
neither torch nor transformers.

One deliberate difference: transformers does not truncate there, and a prompt of more than 32
tokens would give the text encoder a sequence longer than its position table. Such a prompt is
cut to 32 tokens the way CLIP truncates (the end-of-text token stays last), a warning is logged,
and the prompt is reported in :attr:`EncodedPrompts.truncated` so the caller can tell the user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from tokenizers import Tokenizer

from sam3stream.errors import CheckpointError, InputError

__all__ = ["CONTEXT_LENGTH", "EncodedPrompts", "PromptTokenizer", "TruncatedPrompt"]

log = structlog.get_logger(__name__)

CONTEXT_LENGTH = 32  # SAM 3's text encoder has 32 positions
_FALLBACK_PAD = "<|endoftext|>"  # CLIP pads with its end-of-text token

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class TruncatedPrompt:
    index: int  # position in the prompt list
    prompt: str
    tokens: int  # length before truncation, start and end tokens included


@dataclass(frozen=True, slots=True)
class EncodedPrompts:
    input_ids: I64  # [C, 32]
    attention_mask: I64  # [C, 32], 1 = real token
    truncated: tuple[TruncatedPrompt, ...]


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read tokenizer file ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _token_content(value: object) -> str | None:
    """transformers writes special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class PromptTokenizer:
    """Loads ``tokenizer.json`` (plus the optional config files next to it) from a directory."""

    def __init__(self, directory: Path, context_length: int = CONTEXT_LENGTH) -> None:
        self.directory = Path(directory)
        self.context_length = context_length
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file is missing")
        try:
            text = path.read_text(encoding="utf-8")
            # Two copies: one to measure a prompt's full length, one that truncates like CLIP.
            # Any padding/truncation stored in the file is replaced; padding is done here.
            self._full = Tokenizer.from_str(text)
            self._cut = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{path}: not a valid tokenizer file ({exc})") from None
        self._full.no_padding()
        self._full.no_truncation()
        self._cut.no_padding()
        self._cut.enable_truncation(max_length=context_length)

        config = _read_json(self.directory / "tokenizer_config.json") or {}
        special = _read_json(self.directory / "special_tokens_map.json") or {}
        pad = (
            _token_content(config.get("pad_token"))
            or _token_content(special.get("pad_token"))
            or _FALLBACK_PAD
        )
        pad_id = self._full.token_to_id(pad)
        if pad_id is None:
            raise CheckpointError(f"{path}: the pad token {pad!r} is not in the vocabulary")
        self.pad_token = pad
        self.pad_token_id = int(pad_id)
        side = config.get("padding_side", "right")
        if side not in ("left", "right"):
            raise CheckpointError(f"{self.directory / 'tokenizer_config.json'}: padding_side {side!r}")
        self.padding_side: str = side
        self.last_truncated: tuple[TruncatedPrompt, ...] = ()

    def encode_detailed(self, prompts: list[str]) -> EncodedPrompts:
        """Token ids and attention mask [len(prompts), 32], plus the prompts that were cut."""
        if not prompts:
            raise InputError("no prompts given: at least one text prompt is needed")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"prompt {i} is empty: {prompt!r}")

        n = self.context_length
        ids = np.full((len(prompts), n), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(prompts), n), dtype=np.int64)
        truncated: list[TruncatedPrompt] = []
        for i, prompt in enumerate(prompts):
            # One at a time: encode_batch would start the library's thread pool for a handful of
            # prompts, and a pool in use makes later fork()s print warnings and lose parallelism.
            full = self._full.encode(prompt)
            row = self._cut.encode(prompt).ids
            if len(full.ids) > n:
                truncated.append(TruncatedPrompt(index=i, prompt=prompt, tokens=len(full.ids)))
                log.warning("prompt truncated", prompt=prompt, tokens=len(full.ids), limit=n)
            if self.padding_side == "right":
                ids[i, : len(row)] = row
                mask[i, : len(row)] = 1
            else:
                ids[i, n - len(row) :] = row
                mask[i, n - len(row) :] = 1
        result = EncodedPrompts(input_ids=ids, attention_mask=mask, truncated=tuple(truncated))
        self.last_truncated = result.truncated
        return result

    def encode(self, prompts: list[str]) -> tuple[I64, I64]:
        """``(input_ids, attention_mask)``, each int64 [len(prompts), 32].

        Which prompts were truncated is kept in :attr:`last_truncated`.
        """
        result = self.encode_detailed(prompts)
        return result.input_ids, result.attention_mask
