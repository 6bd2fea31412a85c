"""Shard building: JSON and parquet inputs, bad-sample reports, resumability, the CLI."""

from __future__ import annotations

import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from himix_megatron.data import (BuildConfig, DataError, ImageConfig, ShardLoader, TemplateConfig, build_shards,
                                 encode_conversation, parse_conversation)
from himix_megatron.data.image import decode_image, preprocess
from himix_megatron.data.shards import ShardDirectory, ShardReader

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def llava_inputs(tmp_path, helpers):
    """Three good samples and one of each kind of bad one."""
    h = helpers
    records = [
        {"id": "png", "image": "a/0.png", "conversations": h.conv("<image>\nWhat is in the image?", "A red circle.")},
        {"id": "jpg", "image": "b/1.jpg", "conversations": h.conv("Describe it.<image>", "Noise.", "Sure?", "Yes.")},
        {"id": "text", "conversations": h.conv("What is two plus two?", "Four.")},
        {"id": "missing", "image": "nope.png", "conversations": h.conv()},
        {"id": "garbage", "image": "bad.jpg", "conversations": h.conv()},
        {"id": "truncated", "image": "cut.jpg", "conversations": h.conv()},
        {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]},
        {"id": "empty", "image": "a/0.png", "conversations": h.conv("<image>\nQ?", "   ")},
        {"id": "two-images", "image": ["a/0.png", "b/1.jpg"], "conversations": h.conv()},
        {"id": "orphan-placeholder", "conversations": h.conv("<image>\nQ?", "A.")},
        ["not", "a", "record"],
    ]
    jpeg = h.jpeg_bytes(1, (20, 14))
    images = {"a/0.png": h.png_bytes(), "b/1.jpg": jpeg, "bad.jpg": b"this is not a jpeg", "cut.jpg": jpeg[: len(jpeg) // 2]}
    path, folder = h.write_llava(tmp_path, records, images)
    return path, folder, images


def test_json_round_trip(tmp_path, llava_inputs, sp_tok, helpers):
    path, folder, images = llava_inputs
    out = str(tmp_path / "shards")
    index = build_shards(BuildConfig(output=out, json=(path,), image_folder=folder, maxcount=4, progress=False))

    assert sorted(os.listdir(out)) == sorted(["index.json"] + [f"shard-{i:06d}{e}" for i in range(3)
                                                               for e in (".tar", ".meta.json")])
    assert index["num_records"] == 11 and index["num_samples"] == 3 and index["num_skipped"] == 8
    assert [s["count"] for s in index["shards"]] == [3, 0, 0]
    reasons = {s["id"]: s["reason"] for s in index["skipped"]}
    assert reasons == {
        "missing": "missing image", "garbage": "undecodable image", "truncated": "undecodable image",
        "gpt-first": "malformed conversation", "empty": "empty turn", "two-images": "multiple images",
        "orphan-placeholder": "malformed conversation", None: "malformed record",
    }
    assert index["skipped_by_reason"]["undecodable image"] == 2
    with open(os.path.join(out, "index.json")) as f:
        assert json.load(f) == index

    # Any webdataset reader can stream the shard: keys, json and the original image bytes.
    import webdataset as wds

    got = list(wds.WebDataset(os.path.join(out, "shard-000000.tar"), shardshuffle=False))
    assert [json.loads(s["json"])["id"] for s in got] == ["png", "jpg", "text"]
    assert got[0]["png"] == images["a/0.png"] and got[1]["jpg"] == images["b/1.jpg"] and "jpg" not in got[2]

    # ... and our loader turns it into exact batches (vanilla marking, tinyllama, no shuffle).
    cfg = helpers.loader_config(out, shuffle=False, micro_batch_size=3, image=ImageConfig(size=16, aspect_ratio="pad"),
                                template=TemplateConfig("tinyllama", image="mark", system=""), num_samples=3,
                                seq_length=128)
    batch = next(iter(ShardLoader(cfg, sp_tok)))
    assert batch["ids"] == ["png", "jpg", "text"]
    assert batch["has_image"].tolist() == [True, True, False]
    # The template itself is held against the authors' code (test_reference_templates.py); here: the batch holds
    # its ids and trained flags, shifted, padded and masked.
    tok = sp_tok
    with open(path) as f:
        records = {r.get("id"): r for r in json.load(f) if isinstance(r, dict)}
    for row, key in enumerate(["png", "jpg", "text"]):
        conv = parse_conversation(records[key]["conversations"], has_image=key != "text")
        enc = encode_conversation(conv, tok, cfg.template, max_tokens=128)
        ids, trained = enc.ids, enc.targets
        assert ids.count(-200) == (key != "text") and trained.count(True) > 2
        n = len(ids) - 1
        assert batch["lengths"][row] == n
        assert batch["tokens"][row, :n].tolist() == ids[:-1]
        assert (batch["tokens"][row, n:] == tok.pad_id).all()
        labels = batch["labels"][row].tolist()
        assert labels[:n] == [i if t else -100 for i, t in zip(ids[1:], trained[1:])]
        assert labels[n:] == [-100] * (128 - n)
        assert batch["loss_mask"][row].tolist() == [float(t) for t in trained[1:]] + [0.0] * (128 - n)
    # Images: pad-to-square with the mean colour, bicubic resize, (x - 0.5) / 0.5.
    for row, rel in enumerate(["a/0.png", "b/1.jpg"]):
        want = preprocess(decode_image(images[rel]), ImageConfig(size=16, aspect_ratio="pad"))
        assert torch.equal(batch["images"][row], torch.from_numpy(want))
    assert (batch["images"][2] == 0).all()


def test_parquet_input(tmp_path, helpers, sp_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    h = helpers
    jpeg = h.jpeg_bytes(3, (10, 6))
    table = pa.table({
        "id": ["p0", "p1", "p2", "p3"],
        "image": [{"bytes": jpeg, "path": "x.jpg"}, None, {"bytes": b"\x89PNG broken", "path": None},
                  {"bytes": None, "path": "only/a/path.jpg"}],
        "conversations": [h.conv("<image>\nWhat?", "Noise."), h.conv("Hi?", "Hello."), h.conv(), h.conv()],
    })
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=2)
    pq.write_table(table.slice(0, 2), tmp_path / "part-1.parquet")
    out = str(tmp_path / "shards")
    index = build_shards(BuildConfig(output=out, parquet=(str(tmp_path / "part-*.parquet"),), maxcount=3, progress=False))
    assert index["num_records"] == 6 and index["num_samples"] == 4
    assert {(s["source"], s["index"], s["reason"]) for s in index["skipped"]} == {
        ("part-0.parquet", 2, "undecodable image"), ("part-0.parquet", 3, "missing image")}
    cfg = h.loader_config(out, shuffle=False, micro_batch_size=4, num_samples=4)
    batch = next(iter(ShardLoader(cfg, sp_tok)))
    assert batch["ids"] == ["p0", "p1", "p0", "p1"] and batch["has_image"].tolist() == [True, False, True, False]
    want = preprocess(decode_image(jpeg), ImageConfig(size=16))
    assert torch.equal(batch["images"][0], torch.from_numpy(want))


def test_parquet_without_conversations_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="x.parquet: no 'conversations' column"):
        build_shards(BuildConfig(output=str(tmp_path / "o"), parquet=(str(tmp_path / "x.parquet"),), progress=False))


def test_resume_rebuilds_only_unfinished_shards(tmp_path, helpers):
    h = helpers
    records = [{"id": f"r{i}", "conversations": h.conv(f"Q{i}?", f"A{i}.")} for i in range(7)]
    path, _ = h.write_llava(tmp_path, records, {})
    out = str(tmp_path / "shards")
    cfg = BuildConfig(output=out, json=(path,), maxcount=2, progress=False)
    first = build_shards(cfg)
    snapshot = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}

    # A crash mid-shard: shard 2's tar never got renamed, shard 3's sidecar is missing, a tmp file is left.
    os.remove(os.path.join(out, "shard-000002.tar"))
    os.remove(os.path.join(out, "shard-000003.meta.json"))
    open(os.path.join(out, "shard-000002.tar.tmp.999"), "wb").write(b"partial")
    second = build_shards(cfg)
    assert second == first
    assert sorted(os.listdir(out)) == sorted(snapshot)
    for name, data in snapshot.items():
        assert open(os.path.join(out, name), "rb").read() == data, name  # byte-identical rebuild
    rebuilt = {n for n in snapshot if os.stat(os.path.join(out, n)).st_mtime_ns != mtimes[n]}
    assert rebuilt <= {"shard-000002.tar", "shard-000002.meta.json", "shard-000003.tar", "shard-000003.meta.json",
                       "index.json"}
    assert {"shard-000000.tar", "shard-000001.tar"}.isdisjoint(rebuilt)

    # Other inputs into the same directory are refused instead of mixed.
    records.append({"id": "new", "conversations": h.conv("Q?", "A.")})
    h.write_llava(tmp_path, records, {})
    with pytest.raises(DataError, match="built from other inputs"):
        build_shards(cfg)


def test_missing_image_folder_and_inputs(tmp_path, helpers):
    path, _ = helpers.write_llava(tmp_path, [{"id": "a", "image": "x.png", "conversations": helpers.conv()}], {})
    with pytest.raises(DataError, match="give --image-folder"):
        build_shards(BuildConfig(output=str(tmp_path / "o"), json=(path,), progress=False))
    with pytest.raises(DataError, match="no such file"):
        build_shards(BuildConfig(output=str(tmp_path / "o"), json=(str(tmp_path / "none*.json"),), progress=False))
    with pytest.raises(DataError, match="not a directory"):
        BuildConfig(output="o", json=(path,), image_folder=str(tmp_path / "nowhere"))


def test_cli_with_workers(tmp_path, helpers, monkeypatch, capsys):
    h = helpers
    records = [{"id": f"r{i}", "image": "0.png", "conversations": h.conv()} for i in range(9)]
    records.insert(4, {"id": "bad", "conversations": h.conv("<image>\nQ?", "")})
    path, folder = h.write_llava(tmp_path, records, {"0.png": h.png_bytes()})
    out = tmp_path / "shards"
    argv = ["build_shards.py", "--json", path, "--image-folder", folder, "--output", str(out), "--maxcount", "3",
            "--workers", "2", "--no-progress"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(REPO, "tools", "build_shards.py"), run_name="__main__")
    assert e.value.code == 0
    assert "9 samples in 4 shards, 1 skipped" in capsys.readouterr().out
    d = ShardDirectory.open(str(out))
    reader = ShardReader()
    ids = [reader.read(s, j).record["id"] for s in d.shards for j in range(s.count)]
    assert ids == [f"r{i}" for i in range(9)]
    assert np.all([s.readable == s.count for s in d.shards])
