"""Tokenizers behind one small interface, loaded from local files only.

Two families cover the decoders we train:
- sentencepiece `tokenizer.model` (LLaMA, Vicuna, TinyLlama);
- a Hugging Face `tokenizer.json` read by the `tokenizers` library (Llama-3, Qwen2).

Neither library can reach the network from these entry points: both take a file path.

`encode_chunk(text)` is what the HiMix authors' templates call, `tokenizer(text).input_ids` of transformers
4.44 (their pin) with `use_fast=False`: the BOS the tokenizer adds, special-token strings in the text (`</s>`,
`<|endoftext|>`) split out by id, and for sentencepiece the `legacy` flag of `tokenizer_config.json` honoured:
`legacy=True` gives every piece of text between special tokens sentencepiece's dummy-prefix space
(`</s>USER` -> `</s> ▁US ER`); `legacy=False` (vicuna-7b-v1.5, TinyLlama) gives it to the start of the text
only (`</s> USER`). It also returns where each token starts in the text, which the templates' label mask reads.
"""

from __future__ import annotations

import json
import os
import re
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

    def encode_chunk(self, text: str) -> tuple[list[int], list[int]]:
        """`tokenizer(text).input_ids` as transformers gives it, and each token's start offset in `text`
        (-1 for a token the tokenizer added, such as BOS)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, token: str) -> int: ...


class SentencePieceTokenizer:
    """A sentencepiece model file, read as transformers' (slow) LlamaTokenizer reads it: `add_bos_token`,
    `legacy` and the special tokens come from a `tokenizer_config.json` beside it (defaults: BOS added,
    legacy=True, as transformers 4.44 defaults). Pickles by path, so loader workers reload it instead of copying."""

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
        cfg = _tokenizer_config(self.path)
        self.add_bos, self.legacy = _flag(cfg, "add_bos_token", True, self.path), _flag(cfg, "legacy", True, self.path)
        if not self.legacy:
            # transformers loads the model with the dummy prefix switched off and adds the one space itself.
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            with open(self.path, "rb") as f:
                proto.ParseFromString(f.read())
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_plain = spm.SentencePieceProcessor()
            self._sp_plain.LoadFromSerializedProto(proto.SerializeToString())
            self._unk = self._sp.IdToPiece(self._sp.unk_id())
            self._unk_pieces = len(self._sp_plain.EncodeAsIds(self._unk))
        self.vocab_size = int(self._sp.GetPieceSize())
        self.bos_id = _nonneg(self._sp.bos_id())
        self.eos_id = _nonneg(self._sp.eos_id())
        # LLaMA's model has no pad piece (pad_id = -1); LLaVA pads with unk, which the loss mask hides.
        pad = _nonneg(self._sp.pad_id())
        self.pad_id = pad if pad is not None else max(self._sp.unk_id(), 0)
        specials = {self._sp.IdToPiece(i): i for i in (self.bos_id, self.eos_id, _nonneg(self._sp.unk_id()))
                    if i is not None}
        for entry in (cfg.get("added_tokens_decoder") or {}).values():
            content = _token_content(entry)
            if content and self._sp.PieceToId(content) != self._sp.unk_id():
                specials[content] = self._sp.PieceToId(content)
        self._specials = specials
        self._split_specials = _special_splitter(specials)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._load()

    def encode_chunk(self, text: str) -> tuple[list[int], list[int]]:
        ids, starts = ([self.bos_id], [-1]) if self.add_bos and self.bos_id is not None else ([], [])
        if not text:
            return ids, starts
        shift = 0
        if not self.legacy:  # LlamaTokenizer.tokenize: one "▁" in front of the whole text
            text, shift = "\u2581" + text.replace("\u2581", " "), 1
        pieces = []
        for piece, special, at in self._split_specials(text):
            if special is not None:
                pieces.append((special, at))
            else:
                pieces.extend((i, at + start) for i, start in self._encode_segment(piece))
        if not self.legacy and len(pieces) > 1 and pieces[0][0] == self._sp.PieceToId("\u2581") \
                and pieces[1][0] in self._specials.values():
            pieces = pieces[1:]  # "▁</s>": transformers drops the lone prefix before a special token
        ids += [i for i, _ in pieces]
        starts += [max(at - shift, 0) for _, at in pieces]  # the added "▁" belongs to the first character
        return ids, starts

    def _encode_segment(self, text: str) -> list[tuple[int, int]]:
        """Ids and character offsets of text without special tokens, as LlamaTokenizer._tokenize encodes it."""
        if self.legacy:
            return _with_offsets(self._sp, text, 0)
        if not text.startswith(("\u2581", " ")):
            return _with_offsets(self._sp_plain, text, 0)
        # A leading space survives only behind a prefix: transformers encodes unk + text and drops unk's pieces.
        return _with_offsets(self._sp_plain, self._unk + text, len(self._unk))[self._unk_pieces:]

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
        cfg = _tokenizer_config(self.path)
        for key in ("bos", "eos", "pad"):
            if names[key] is None:
                names[key] = _token_content(cfg.get(f"{key}_token"))
        # transformers registers the config's special tokens with the backend, which then splits them out of any
        # text ("...</s>USER"); a tokenizer.json that does not list them as added tokens is read the same way.
        from tokenizers import AddedToken

        specials = [names[k] for k in ("bos", "eos", "pad")] + [_token_content(cfg.get("unk_token"))]
        specials += [_token_content(e) for e in (cfg.get("added_tokens_decoder") or {}).values()
                     if isinstance(e, dict) and e.get("special")]
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)
                                      if t and self._tok.token_to_id(t) is not None])
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

    def encode_chunk(self, text: str) -> tuple[list[int], list[int]]:
        # The post-processor adds what transformers adds (Llama-3's <|begin_of_text|>, nothing for Qwen2).
        enc = self._tok.encode(text, add_special_tokens=True)
        added = enc.special_tokens_mask
        return list(enc.ids), [-1 if a else start for a, (start, _) in zip(added, enc.offsets)]

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


def _tokenizer_config(model_path: str) -> dict:
    path = os.path.join(os.path.dirname(model_path), "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: expected a JSON object")
    return cfg


def _flag(cfg: dict, key: str, default: bool, path: str) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise DataError(f"{os.path.dirname(path)}/tokenizer_config.json: {key}={value!r} must be true or false")
    return value


def _special_splitter(specials: dict):
    """text -> [(piece, id of the special token it is or None, offset of the piece)], empty pieces left out."""
    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")

    def split(text: str):
        out, at = [], 0
        for k, piece in enumerate(pattern.split(text) if specials else [text]):
            if piece:
                out.append((piece, specials[piece] if k % 2 else None, at))
            at += len(piece)
        return out

    return split


def _with_offsets(sp, text: str, skip: int) -> list[tuple[int, int]]:
    """Ids of `text` with the character offset each piece starts at, less `skip` characters."""
    proto = sp.encode(text, return_type="proto")
    char_at = _byte_to_char(text)
    return [(p.id, char_at[p.begin] - skip) for p in proto.pieces]


def _byte_to_char(text: str) -> list[int]:
    table = []
    for i, ch in enumerate(text):
        table.extend([i] * len(ch.encode("utf-8")))
    table.append(len(text))
    return table


def _nonneg(i: int) -> Optional[int]:
    return int(i) if i is not None and i >= 0 else None


def _token_content(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value or None
