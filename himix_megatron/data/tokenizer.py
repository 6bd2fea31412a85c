"""Tokenizers behind one small interface, loaded from local files only.

Two families cover the decoders we train:
- sentencepiece `tokenizer.model` (LLaMA, Vicuna, TinyLlama);
- a Hugging Face `tokenizer.json` read by the `tokenizers` library (Llama-3, Qwen2).

Neither library can reach the network from these entry points: both take a file path. Templates never
ask the tokenizer to add special tokens; they place BOS/EOS and chat markers themselves, by id, so the
label mask knows exactly which position every special token occupies.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Protocol, Sequence, runtime_checkable

from himix_megatron.data.records import DataError


@runtime_checkable
class Tokenizer(Protocol):
    """What templates and the loader need from a tokenizer."""

    path: str
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, token: str) -> int: ...


class SentencePieceTokenizer:
    """A sentencepiece model file. Pickles by path, so loader workers reload it instead of copying."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise DataError(f"sentencepiece model not found: {path}")
        self.path = path
        self._load()

    def _load(self) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{self.path}: not a sentencepiece model ({e})") from None
        self.vocab_size = int(self._sp.GetPieceSize())
        self.bos_id = _nonneg(self._sp.bos_id())
        self.eos_id = _nonneg(self._sp.eos_id())
        # LLaMA's model has no pad piece (pad_id = -1); LLaVA pads with unk, which the loss mask hides.
        pad = _nonneg(self._sp.pad_id())
        self.pad_id = pad if pad is not None else max(self._sp.unk_id(), 0)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._load()

    def encode(self, text: str) -> list[int]:
        # Segments are cut just before a space; the dummy prefix "▁" re-creates that space, so
        # encoding segment by segment gives the same pieces as encoding the joined string.
        if text.startswith(" "):
            text = text[1:]
        return list(self._sp.EncodeAsIds(text)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def token_id(self, token: str) -> int:
        idx = self._sp.PieceToId(token)
        if idx == self._sp.unk_id() and token != self._sp.IdToPiece(idx):
            raise DataError(f"{self.path}: token {token!r} is not in the vocabulary")
        return int(idx)


class HFTokenizer:
    """A `tokenizer.json` (fast tokenizer) file. Special tokens come from arguments, else from a
    `tokenizer_config.json` beside it, as transformers would read them."""

    def __init__(
        self,
        path: str,
        *,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
    ):
        if not os.path.isfile(path):
            raise DataError(f"tokenizer.json not found: {path}")
        self.path = path
        self._names = dict(bos=bos_token, eos=eos_token, pad=pad_token)
        self._load()

    def _load(self) -> None:
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(self.path)
        except Exception as e:  # the Rust side raises its own Exception type
            raise DataError(f"{self.path}: not a tokenizers JSON file ({e})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        names = dict(self._names)
        cfg_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
            for key in ("bos", "eos", "pad"):
                if names[key] is None:
                    names[key] = _token_content(cfg.get(f"{key}_token"))
        self.bos_id = self.token_id(names["bos"]) if names["bos"] else None
        self.eos_id = self.token_id(names["eos"]) if names["eos"] else None
        pad = self.token_id(names["pad"]) if names["pad"] else None
        # Pad positions carry loss_mask 0 and sit after the text (causal), so any id is harmless.
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def __getstate__(self):
        return {"path": self.path, "_names": self._names}

    def __setstate__(self, state):
        self.path, self._names = state["path"], state["_names"]
        self._load()

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise DataError(f"{self.path}: token {token!r} is not in the vocabulary")
        return int(idx)


def load_tokenizer(path: str, **special_tokens) -> Tokenizer:
    """`path` is a `tokenizer.model`, a `tokenizer.json`, or a directory holding one of them."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), **special_tokens)
        raise DataError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if path.endswith(".json"):
        return HFTokenizer(path, **special_tokens)
    if special_tokens:
        raise DataError(f"{path}: special token overrides apply to tokenizer.json only")
    return SentencePieceTokenizer(path)


def _nonneg(i: int) -> Optional[int]:
    return int(i) if i is not None and i >= 0 else None


def _token_content(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value or None
