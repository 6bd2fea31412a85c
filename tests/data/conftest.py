"""Fixtures for the data tests: real tokenizers trained here, small LLaVA-format inputs, built shards.

Everything is generated in temporary directories; nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest

from data_utils import jpeg_bytes, png_bytes  # noqa: F401 - the data tests take them from here
from tokenizer_utils import train_byte_bpe, train_sentencepiece


@pytest.fixture(scope="session")
def sp_path(tmp_path_factory) -> str:
    """A real sentencepiece model configured like LLaMA's (tokenizer_utils.train_sentencepiece)."""
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def sp_tok(sp_path):
    from himix_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(sp_path)


@pytest.fixture(scope="session")
def bpe_path(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer.json (the Llama-3 / Qwen2 family) with their chat special tokens."""
    d = tmp_path_factory.mktemp("bpe")
    train_byte_bpe().save(str(d / "tokenizer.json"))
    return str(d / "tokenizer.json")


def conv(q="<image>\nWhat is in the image?", a="A red circle.", *more):
    turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    for i, v in enumerate(more):
        turns.append({"from": "human" if i % 2 == 0 else "gpt", "value": v})
    return turns


def write_llava(tmp_path, records, images: dict) -> tuple[str, str]:
    """Write `records` as a LLaVA JSON file and `images` {relative path: bytes} under an image folder."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for rel, data in images.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path), str(folder)


def answer_shards(tmp, prefix: str, answers: list, *, maxcount: int, colour) -> str:
    """Shards of one question per answer (ids {prefix}00, ...), every third sample text-only; image i is a small
    PNG of `colour(i)`. Returns the shard directory."""
    from himix_megatron.data.build import BuildConfig, build_shards

    records, images = [], {}
    for i, answer in enumerate(answers):
        rec = {"id": f"{prefix}{i:02d}", "conversations": conv(f"<image>\nQuestion {i}?", answer)}
        if i % 3 == 2:
            rec["conversations"] = conv(f"Question {i}?", answer)
        else:
            rec["image"] = f"{i}.png"
            images[f"{i}.png"] = png_bytes(colour(i), (8 + i % 5, 8))
        records.append(rec)
    path, folder = write_llava(tmp, records, images)
    out = str(tmp / "shards")
    build_shards(BuildConfig(output=out, json=(path,), image_folder=folder, maxcount=maxcount, progress=False))
    return out


@pytest.fixture(scope="session")
def uniform_shards(tmp_path_factory):
    """48 valid samples (ids s00..s47; every third one text-only) in shards of 10 records."""
    return answer_shards(tmp_path_factory.mktemp("uniform"), "s", [f"Answer {i}." for i in range(48)], maxcount=10,
                         colour=lambda i: (i * 5, 100, 200 - i))


def loader_config(paths, **kw):
    from himix_megatron.data import DatasetSpec, ImageConfig, LoaderConfig, TemplateConfig

    specs = tuple(p if not isinstance(p, str) else DatasetSpec.of(p) for p in (paths if isinstance(paths, list) else [paths]))
    base = dict(datasets=specs, micro_batch_size=4, seq_length=64, template=TemplateConfig("tinyllama", system=""),
                image=ImageConfig(size=16), num_workers=0, seed=7)
    base.update(kw)
    return LoaderConfig(**base)


def ids_of(batches):
    return [i for b in batches for i in b["ids"]]


@pytest.fixture
def helpers():
    """Plain functions shared by the test modules (kept here: no importable helper module needed)."""

    class H:
        pass

    for f in (png_bytes, jpeg_bytes, conv, write_llava, loader_config, ids_of):
        setattr(H, f.__name__, staticmethod(f))
    return H
