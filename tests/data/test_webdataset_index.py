"""Existing webdataset tars indexed in place (data/webdataset_index.py, tools/build_shards.py --webdataset).

The tars are written by the webdataset package's own TarWriter (pax headers, image member before the json, other
members beside them), holding the samples of shards built the usual way plus corrupt ones in between. Indexing
writes only sidecars and index.json, skips and counts the corrupt samples with the builder's reasons, and the
loader then reads exactly the built shards' samples; training from the tars equals training from the shards.
"""

from __future__ import annotations

import gzip
import json
import os
import runpy
import shutil
import sys

import pytest

from data_utils import jpeg_bytes, png_bytes

from himix_megatron.data.records import DataError
from himix_megatron.data.shards import ShardDirectory, ShardReader
from himix_megatron.data.webdataset_index import IndexConfig, Layout, index_webdataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Corrupt samples put between the good ones, and the reason the builder gives each.
CORRUPT = {
    "undecodable": ("undecodable image", lambda key: {"__key__": key, "jpg": b"\xff\xd8 not a jpeg",
                                                      "json": {"conversations": _conv()}}),
    "badjson": ("malformed record", lambda key: {"__key__": key, "jpg": jpeg_bytes(1), "json": b"{not json"}),
    "noconv": ("malformed conversation", lambda key: {"__key__": key, "jpg": jpeg_bytes(2),
                                                      "json": {"caption": "a cat"}}),
    "twoimages": ("multiple images", lambda key: {"__key__": key, "jpg": jpeg_bytes(3), "png": png_bytes(),
                                                  "json": {"conversations": _conv()}}),
    "emptyturn": ("empty turn", lambda key: {"__key__": key, "jpg": jpeg_bytes(4),
                                             "json": {"conversations": _conv(answer=" ")}}),
    "noimagebutplaceholder": ("malformed conversation", lambda key: {"__key__": key,
                                                                     "json": {"conversations": _conv()}}),
}


def _conv(answer="A red circle."):
    return [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Synthetic samples built the usual way (build_shards), three shards of 60."""
    from himix_megatron.data.synthetic import SyntheticConfig, generate, write_word_tokenizer

    root = tmp_path_factory.mktemp("built")
    generate(SyntheticConfig(num_samples=180, seed=3, maxcount=60), str(root / "shards"))
    write_word_tokenizer(str(root / "tok"))
    return root


def built_samples(directory) -> list[list]:
    """Every sample of a shard directory, shard by shard, through the loader's reader."""
    data, reader = ShardDirectory.open(str(directory)), ShardReader()
    return [[reader.read(shard, i) for i in range(shard.count)] for shard in data.shards]


def write_tars(built_dir, out_dir, *, corrupt=True, json_member="json", key="conversations", extra=True) -> dict:
    """The built shards' samples as webdataset tars (TarWriter), one tar per shard, a corrupt sample after every
    eighth good one; returns {reason: count} of the corrupt ones written."""
    import webdataset as wds

    os.makedirs(out_dir, exist_ok=True)
    written, kinds = {}, list(CORRUPT)
    for s, samples in enumerate(built_samples(built_dir)):
        with wds.TarWriter(os.path.join(str(out_dir), f"part-{s:03d}.tar")) as sink:
            for i, sample in enumerate(samples):
                obj = {"__key__": f"s{s}/{i:05d}",
                       json_member: {"id": sample.record["id"], key: sample.record["conversations"]}}
                if sample.image is not None:
                    obj[sample.image_ext] = sample.image
                if extra:
                    obj["txt"] = "an img2dataset-style caption, ignored"
                sink.write(obj)
                if corrupt and i % 8 == 7:
                    kind = kinds[(s * 60 + i) // 8 % len(kinds)]
                    reason, make = CORRUPT[kind]
                    sink.write(make(f"s{s}/{i:05d}-{kind}"))
                    written[reason] = written.get(reason, 0) + 1
    return written


def assert_same_samples(built_dir, indexed_dir) -> None:
    built, indexed = built_samples(built_dir), built_samples(indexed_dir)
    assert [len(s) for s in indexed] == [len(s) for s in built]
    for b_shard, i_shard in zip(built, indexed):
        for b, i in zip(b_shard, i_shard):
            assert i.image == b.image and i.record["conversations"] == b.record["conversations"]
            assert i.record["id"] == b.record["id"] and i.record["has_image"] == b.record["has_image"]


def test_indexing_skips_and_counts_corrupt_samples_and_reads_the_rest_in_place(built, tmp_path):
    tars = tmp_path / "tars"
    written = write_tars(built / "shards", tars)
    before = {p: os.path.getsize(tars / p) for p in os.listdir(tars)}
    index = index_webdataset(IndexConfig((str(tars),), str(tmp_path / "index"), progress=False))
    assert index["num_samples"] == 180 and index["skipped_by_reason"] == written
    assert sorted(os.listdir(tmp_path / "index")) == ["index.json"] + sorted(
        e["meta"] for e in index["shards"])  # sidecars and the index only: no tar, no image copied
    assert {p: os.path.getsize(tars / p) for p in os.listdir(tars)} == before
    assert_same_samples(built / "shards", tmp_path / "index")
    # The planner's read of the json member alone agrees with the full read.
    data, reader = ShardDirectory.open(str(tmp_path / "index")), ShardReader()
    for shard in data.shards:
        for i in range(0, shard.count, 7):
            record, full = reader.read_record(shard, i), reader.read(shard, i).record
            assert record["conversations"] == full["conversations"] and record["has_image"] == full["has_image"]


def test_resume_parallel_and_a_damaged_tar(built, tmp_path):
    """Workers give the same index; a rerun reuses every sidecar; a tar cut short keeps what precedes the cut,
    and a sample whose bytes changed since indexing fails its CRC at read time."""
    tars = tmp_path / "tars"
    write_tars(built / "shards", tars)
    one = index_webdataset(IndexConfig((str(tars / "*.tar"),), str(tmp_path / "a"), progress=False))
    two = index_webdataset(IndexConfig((str(tars),), str(tmp_path / "b"), workers=2, progress=False))
    def comparable(index):  # PIL's messages name a BytesIO's address; sidecar paths differ between outputs
        return ({k: v for k, v in index.items() if k not in ("shards", "skipped", "fingerprint")},
                [{k: v for k, v in s.items() if k != "detail"} for s in index["skipped"]],
                [{k: v for k, v in s.items() if k != "meta"} for s in index["shards"]])

    assert comparable(one) == comparable(two)
    sidecars = {p: os.path.getmtime(tmp_path / "a" / p) for p in os.listdir(tmp_path / "a") if p != "index.json"}
    again = index_webdataset(IndexConfig((str(tars),), str(tmp_path / "a"), progress=False))
    assert again == one
    assert {p: os.path.getmtime(tmp_path / "a" / p) for p in sidecars} == sidecars  # nothing rescanned

    last = tars / "part-002.tar"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    cut = index_webdataset(IndexConfig((str(tars),), str(tmp_path / "a"), progress=False))
    kept = cut["shards"][2]["count"]
    assert 0 < kept < 60 and cut["num_samples"] == 120 + kept
    prefix = built_samples(tmp_path / "a")[2]
    assert [s.record["id"] for s in prefix] == [s.record["id"] for s in built_samples(built / "shards")[2]][:kept]

    from himix_megatron.data.records import SampleError

    shard = ShardDirectory.open(str(tmp_path / "a")).shards[0]
    raw = bytearray((tars / "part-000.tar").read_bytes())
    raw[int(shard.offsets[3]) + 600] ^= 0xFF  # inside sample 3
    (tars / "part-000.tar").write_bytes(bytes(raw))
    with pytest.raises(SampleError, match="checksum mismatch"):
        ShardReader().read(shard, 3)


def test_other_member_names_through_the_layout_flags(built, tmp_path):
    tars = tmp_path / "tars"
    write_tars(built / "shards", tars, corrupt=False, json_member="llava.json", key="messages", extra=False)
    with pytest.raises(DataError, match="--wds-image-members"):
        Layout(json="jpg", images=("jpg",))
    default = index_webdataset(IndexConfig((str(tars),), str(tmp_path / "default"), progress=False))
    assert default["num_samples"] == 0 and default["skipped_by_reason"] == {"malformed record": 180}
    layout = Layout(json="llava.json", conversations="messages")
    index = index_webdataset(IndexConfig((str(tars),), str(tmp_path / "index"), layout, progress=False))
    assert index["num_samples"] == 180 and index["layout"]["conversations"] == "messages"
    assert_same_samples(built / "shards", tmp_path / "index")


def test_compressed_tars_are_refused_or_rewritten(built, tmp_path):
    tars = tmp_path / "tars"
    write_tars(built / "shards", tars, corrupt=False)
    for name in ("part-001.tar", "part-002.tar"):
        with open(tars / name, "rb") as src, gzip.open(str(tars / name) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(tars / name)
    with pytest.raises(DataError, match=r"part-001\.tar\.gz: gzip-compressed.*gunzip.*--rewrite-compressed"):
        index_webdataset(IndexConfig((str(tars),), str(tmp_path / "index"), progress=False))
    index = index_webdataset(IndexConfig((str(tars),), str(tmp_path / "index"), rewrite_compressed=True,
                                         progress=False))
    assert [os.path.dirname(e["name"]) for e in index["shards"]] == ["../tars", "", ""]
    assert_same_samples(built / "shards", tmp_path / "index")


def _build_shards(monkeypatch, *args) -> int:
    monkeypatch.setattr(sys, "argv", ["build_shards.py", *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "tools", "build_shards.py"), run_name="__main__")
    return e.value.code


def test_cli(built, tmp_path, monkeypatch, capsys):
    tars = tmp_path / "tars"
    write_tars(built / "shards", tars)
    assert _build_shards(monkeypatch, "--webdataset", str(tars), "--output", str(tars), "--workers", "2",
                         "--no-progress") == 0
    assert "180 samples in 3 tars indexed in place" in capsys.readouterr().out
    assert json.loads((tars / "index.json").read_text())["shards"][0]["name"] == "part-000.tar"  # beside the tars
    assert _build_shards(monkeypatch, "--webdataset", str(tmp_path / "none"), "--output", str(tmp_path / "x")) == 2
    assert "--webdataset" in capsys.readouterr().err
    assert _build_shards(monkeypatch, "--webdataset", str(tars), "--json", "x.json", "--output",
                         str(tmp_path / "y")) == 2
    assert "--webdataset indexes tars in place: it takes no --json" in capsys.readouterr().err


def _train(cfg):
    from himix_megatron.training.trainer import train

    return train(cfg)


@pytest.mark.slow
def test_training_from_indexed_tars_equals_training_from_built_shards(built, tmp_path):
    """The same samples in the same order at DP=2, so the same losses, bit for bit."""
    from himix_megatron.config import ParallelConfig
    from himix_megatron.training.config import TrainConfig
    from multiprocess import run_world

    write_tars(built / "shards", tmp_path / "tars")
    index_webdataset(IndexConfig((str(tmp_path / "tars"),), str(tmp_path / "index"), progress=False))
    losses = []
    for data in (built / "shards", tmp_path / "index"):
        cfg = TrainConfig(data_path=[str(data)], tokenizer_model=str(built / "tok"), system_prompt="", seq_length=24,
                          micro_batch_size=4, global_batch_size=8, lr=3e-3, train_iters=4, num_workers=1,
                          progress=False, log_interval=100)
        result = run_world(2, ParallelConfig(1, 1), _train, cfg)[0]
        losses.append([h["loss"] for h in result["history"]])
    assert len(losses[0]) == 4 and losses[0] == losses[1]
