"""Hugging Face model directories: lazy tensor access, config, tokenizer files, sharded safetensors output.

Reading is lazy because every import rank opens the same checkpoint and needs only its own layers:
safetensors are memory-mapped per tensor, and `.bin` files are loaded with `mmap=True` only when one
of their tensors is first asked for.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Iterator, Optional

import torch
from torch import Tensor

from himix_megatron.convert.layout import ConversionError

# What a tokenizer needs, across sentencepiece (Llama-2, Vicuna) and byte-level BPE (Llama-3, Qwen2).
# generation_config.json travels with them: it holds the bos/eos ids that `generate` stops on.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                 ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face model directory)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class HFTensors(Mapping):
    """Read-only name -> tensor view of the weights of an HF model directory, loading on access."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise ConversionError(f"{directory}: no such directory")
        self.directory = directory
        self._open: dict[str, object] = {}  # file name -> safetensors handle or mmapped state dict
        self._file_of: dict[str, str] = {}
        for index, single in _WEIGHT_FILES:
            if os.path.isfile(os.path.join(directory, index)):
                with open(os.path.join(directory, index), encoding="utf-8") as f:
                    self._file_of = dict(json.load(f)["weight_map"])
                break
            if os.path.isfile(os.path.join(directory, single)):
                self._file_of = {k: single for k in self._keys_of(single)}
                break
        else:
            # Shards without an index: take every shard, safetensors before .bin (other .bin files,
            # such as training_args.bin, are not weights).
            for prefix, suffix in (("", ".safetensors"), ("pytorch_model", ".bin")):
                for name in sorted(os.listdir(directory)):
                    if name.startswith(prefix) and name.endswith(suffix):
                        self._file_of.update({k: name for k in self._keys_of(name)})
                if self._file_of:
                    break
        if not self._file_of:
            raise ConversionError(f"{directory}: no model weights (model.safetensors[.index.json] or "
                                  "pytorch_model.bin[.index.json])")

    def _keys_of(self, name: str) -> list[str]:
        return list(self._handle(name).keys())

    def _handle(self, name: str):
        if name not in self._open:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise ConversionError(f"{path}: weight file listed in the index is missing")
            if name.endswith(".safetensors"):
                from safetensors import safe_open

                handle = safe_open(path, framework="pt")
            else:
                try:
                    handle = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except RuntimeError:  # the pre-zipfile format (torch < 1.6) cannot be memory-mapped
                    handle = torch.load(path, map_location="cpu", weights_only=True)
            self._open[name] = handle
        return self._open[name]

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._file_of:
            raise KeyError(key)
        handle = self._handle(self._file_of[key])
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self._file_of[key])
        if hasattr(handle, "get_slice"):
            return tuple(handle.get_slice(key).get_shape())
        return tuple(handle[key].shape)

    def __contains__(self, key) -> bool:
        return key in self._file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def check_tensors(tensors: HFTensors, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Every tensor of `shapes` present with that shape, or an error naming the first one that is not."""
    for key, shape in shapes.items():
        if key not in tensors:
            raise ConversionError(f"{tensors.directory}: missing {what} tensor {key!r}")
        found = tensors.shape(key)
        if tuple(found) != tuple(shape):
            raise ConversionError(f"{tensors.directory}: {what} tensor {key!r} has shape {tuple(found)}, "
                                  f"the config implies {tuple(shape)}")


def stage_tokenizer(source: str, target: str, config: Optional[dict] = None) -> list[str]:
    """Copy the tokenizer files of `source` into `target`; returns the names copied.

    Without a generation_config.json, one is written from the LM config's bos/eos/pad ids."""
    os.makedirs(target, exist_ok=True)
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    for name in copied:
        shutil.copy2(os.path.join(source, name), os.path.join(target, name))
    if "generation_config.json" not in copied and config is not None:
        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        if ids:
            with open(os.path.join(target, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump(ids, f, indent=1)
            copied.append("generation_config.json")
    return copied


def write_safetensors(tensors: Mapping[str, Tensor], directory: str, max_shard_size="5GB") -> list[str]:
    """Sharded safetensors + model.safetensors.index.json (always an index, even for one shard)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(dict(tensors), filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    files = split.filename_to_tensors
    if not split.is_sharded:  # one shard: keep the index-based layout, so tools read one format
        files = {"model-00001-of-00001.safetensors": next(iter(files.values()))}
    for filename, names in files.items():
        # A private contiguous copy: views of one fused megatron tensor must not share storage on disk.
        save_file({n: tensors[n].contiguous().clone() for n in names}, os.path.join(directory, filename),
                  metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {n: f for f, names in files.items() for n in sorted(names)}}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return sorted(files)
