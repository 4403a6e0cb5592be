"""A small CLIP-style BPE tokenizer, written in the same files as SAM 3's real one.

Random/tiny checkpoints need tokenizer files, and tests should not depend on downloading
facebook/sam3's 49408-token vocabulary. This builds a CLIP-shaped tokenizer with the same
pipeline (NFC + whitespace collapse + lowercase, CLIP's split regex, byte-level alphabet, BPE with
a ``</w>`` end-of-word suffix, ``<|startoftext|> ... <|endoftext|>``), so runtime tokenization code
exercised against it behaves as against the real one.

The vocabulary is CLIP's layout in miniature: the 256 byte symbols, the same 256 with ``</w>``
(so any text tokenizes, nothing maps to unk), merges learned from a built-in word list of typical
prompts, then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids (CLIP: 49406, 49407).
Every word of the list tokenizes to a single token.

Merges are learned by a small BPE loop here rather than ``tokenizers.trainers.BpeTrainer``: the
trainer breaks frequency ties in hash order when ``end_of_word_suffix`` is set, so its output can
differ between runs. Here ties go to the lexicographically smallest pair and the files are
byte-for-byte reproducible.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "TINY_TOKENIZER_FILES",
    "WORDS",
    "bytes_to_unicode",
    "write_tiny_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also pad and unk, as in CLIP
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 32
TINY_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)

# CLIP's pre-tokenizer split (transformers' CLIPTokenizer uses the same pattern).
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# Prompts the service is typically asked for, and the words they are made of.
WORDS: tuple[str, ...] = (
    # people and body
    "person", "people", "man", "woman", "child", "worker", "customer", "face", "head", "hand", "hands",
    "arm", "leg", "foot", "finger", "helmet", "glove", "gloves", "vest", "jacket", "shirt", "shoe", "hat",
    "glasses", "mask", "bag", "backpack",
    # workshop and tools
    "blow gun", "air", "hose", "tool", "tools", "hammer", "wrench", "screwdriver", "drill", "saw", "knife",
    "scissors", "tape", "pliers", "ladder", "bucket", "brush", "broom", "cable", "wire", "pipe", "valve",
    "machine", "robot", "conveyor", "belt", "pallet", "forklift", "crate", "container", "barrel", "can",
    "bottle", "cup", "lid", "label", "sticker", "screw", "bolt", "nut", "part",
    # store and warehouse
    "counter", "shelf", "shelves", "rack", "box", "boxes", "package", "parcel", "cart", "trolley",
    "basket", "register", "screen", "monitor", "phone", "keyboard", "laptop", "scanner", "door", "window",
    "sign", "floor", "wall", "ceiling", "light", "lamp", "table", "desk", "chair", "bench", "stool",
    "drawer", "cabinet", "fridge", "freezer", "oven", "sink", "tap",
    # vehicles and outdoors
    "car", "truck", "van", "bus", "bike", "bicycle", "motorcycle", "scooter", "train", "boat", "plane",
    "wheel", "tire", "license", "plate", "road", "street", "sidewalk", "crosswalk", "traffic", "cone",
    "tree", "grass", "fence", "gate", "pole", "building", "house", "roof", "parking", "lot",
    # animals
    "dog", "cat", "bird", "horse", "cow", "sheep", "pig", "chicken", "duck", "fish", "mouse", "rat",
    # food
    "apple", "banana", "orange", "bread", "pizza", "sandwich", "bowl", "fork", "spoon",
    # attributes
    "red", "green", "blue", "yellow", "white", "black", "gray", "brown", "pink", "purple", "small",
    "large", "big", "open", "closed", "empty", "full", "left", "right", "top", "bottom", "front", "back",
    "metal", "wooden", "plastic", "paper", "glass",
    # glue words
    "a", "an", "the", "of", "on", "in", "with", "and", "or", "at", "to", "near", "holding", "wearing",
    "sitting", "standing", "walking", "carrying",
)  # fmt: skip

DEFAULT_VOCAB_SIZE = 1280  # an upper bound: the built-in words need about 1030


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table, in CLIP's vocabulary order."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def _pipeline(tokenizer: Tokenizer) -> None:
    """CLIP's normalizer, pre-tokenizer and decoder (as transformers' CLIPTokenizer builds them)."""
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()


def _learn_merges(words: Counter[str], budget: int) -> list[tuple[str, str]]:
    """Plain BPE over pre-tokenized words; ties broken by the smallest pair, so it is deterministic."""
    splits: dict[str, list[str]] = {}
    for word in sorted(words):
        symbols = list(word)
        symbols[-1] += END_OF_WORD
        splits[word] = symbols
    merges: list[tuple[str, str]] = []
    while len(merges) < budget:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in splits.items():
            for pair in pairwise(symbols):
                pairs[pair] += words[word]
        if not pairs:
            break  # every word is one token
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for word, symbols in splits.items():
            i = 0
            out: list[str] = []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[word] = out
    return merges


def _build(vocab_size: int) -> tuple[Tokenizer, dict[str, int], list[tuple[str, str]]]:
    if vocab_size < 512 + 2:
        raise ValueError(
            f"vocab_size must be at least 514 (256 bytes x 2 + 2 special tokens), got {vocab_size}"
        )
    splitter = Tokenizer(models.BPE())
    _pipeline(splitter)
    assert splitter.normalizer is not None and splitter.pre_tokenizer is not None
    words: Counter[str] = Counter()
    for phrase in WORDS:
        normalized = splitter.normalizer.normalize_str(phrase)
        for piece, _ in splitter.pre_tokenizer.pre_tokenize_str(normalized):
            words[piece] += 1

    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + END_OF_WORD for c in alphabet)]:
        vocab[token] = len(vocab)
    merges = _learn_merges(words, vocab_size - 2 - len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    bos_id, eos_id = len(vocab), len(vocab) + 1
    vocab[BOS_TOKEN] = bos_id
    vocab[EOS_TOKEN] = eos_id

    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=EOS_TOKEN,
        )
    )
    _pipeline(tokenizer)
    tokenizer.add_special_tokens(
        [
            AddedToken(BOS_TOKEN, special=True, normalized=False),
            AddedToken(EOS_TOKEN, special=True, normalized=False),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    return tokenizer, vocab, merges


def _special(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")


def write_tiny_tokenizer(out_dir: Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> int:
    """Write a small CLIP BPE tokenizer's files into ``out_dir``; return its vocabulary size.

    ``vocab_size`` is an upper bound: merges stop early once every built-in word is a single
    token (the default leaves room for that). The special tokens are the last two ids:
    ``<|startoftext|>`` = size - 2 and ``<|endoftext|>`` (eos, pad, unk) = size - 1.
    Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.json and
    merges.txt; identical bytes on every call.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab, merges = _build(vocab_size)
    size = len(vocab)
    if tokenizer.get_vocab_size(with_added_tokens=True) != size:
        raise AssertionError("tiny tokenizer vocabulary is inconsistent")

    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    by_id = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    _write_text(out_dir / "vocab.json", json.dumps(by_id, ensure_ascii=False) + "\n")
    _write_text(out_dir / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    special_map = {
        "bos_token": _special(BOS_TOKEN),
        "eos_token": _special(EOS_TOKEN),
        "pad_token": _special(EOS_TOKEN),
        "unk_token": _special(EOS_TOKEN),
    }
    _write_text(out_dir / "special_tokens_map.json", json.dumps(special_map, indent=2, sort_keys=True) + "\n")
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab[BOS_TOKEN]): {**_special(BOS_TOKEN), "special": True},
            str(vocab[EOS_TOKEN]): {**_special(EOS_TOKEN), "special": True},
        },
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": CONTEXT_LENGTH,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS_TOKEN,
    }
    _write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return size
