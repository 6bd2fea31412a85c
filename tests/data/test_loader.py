"""The loader: order, data-parallel split, save/restore, blending, bad-data accounting."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from itertools import islice

import pytest
import torch

from himix_megatron.data import DataError, DataLoaderAbort, DatasetSpec, SampleOrder, ShardLoader
from himix_megatron.data.sampler import rank_position

ALL = {f"s{i:02d}" for i in range(48)}


def take(loader, n):
    return list(islice(iter(loader), n))


def test_sample_order_epochs_and_blend():
    # Concatenation: each epoch is a permutation of everything, different per epoch and seed.
    order = SampleOrder([30, 20], seed=3)
    epochs = [[order(g) for g in range(e * 50, (e + 1) * 50)] for e in range(3)]
    for ep in epochs:
        assert sorted(ep) == [(0, i) for i in range(30)] + [(1, i) for i in range(20)]
    assert epochs[0] != epochs[1] != epochs[2]
    assert [SampleOrder([30, 20], seed=4)(g) for g in range(50)] != epochs[0]
    assert [SampleOrder([30, 20], seed=3, shuffle=False)(g) for g in range(50)] == sorted(epochs[0])

    # Weighted blend 3:1: exact shares per pattern chunk, even interleaving, exact per-dataset epochs.
    order = SampleOrder([20, 50], weights=[3, 1], seed=0, chunk=100)
    picks = [order(g) for g in range(400)]
    assert Counter(d for d, _ in picks) == {0: 300, 1: 100}
    assert all(2 <= Counter(d for d, _ in picks[i:i + 8])[0] <= 7 for i in range(0, 400, 8))
    a = [i for d, i in picks if d == 0]
    for e in range(15):  # dataset 0 runs 15 epochs of 20 in these 300 picks
        assert sorted(a[e * 20:(e + 1) * 20]) == list(range(20))
    b = [i for d, i in picks if d == 1]
    assert len(set(b)) == 50 and sorted(b[:50]) == list(range(50))
    with pytest.raises(DataError, match="below 1/100"):
        SampleOrder([5, 5], weights=[1, 1e-4], chunk=100)


def test_dp2_split_covers_every_sample_once(uniform_shards, sp_tok, helpers):
    per_rank = []
    for rank in range(2):
        cfg = helpers.loader_config(uniform_shards, num_samples=48, drop_last=False, micro_batch_size=5)
        per_rank.append(helpers.ids_of(ShardLoader(cfg, sp_tok, rank=rank, world_size=2)))
    assert len(per_rank[0]) == len(per_rank[1]) == 24
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == ALL

    # Endless stream: the second epoch again covers everything once, in a new order.
    streams = [helpers.ids_of(take(ShardLoader(helpers.loader_config(uniform_shards), sp_tok, rank=r, world_size=2), 12))
               for r in range(2)]
    for epoch in range(2):
        seen = streams[0][epoch * 24:(epoch + 1) * 24] + streams[1][epoch * 24:(epoch + 1) * 24]
        assert sorted(seen) == sorted(ALL)
    assert streams[0][:24] != streams[0][24:]


def test_worker_count_does_not_change_the_stream(uniform_shards, sp_tok, helpers):
    runs = []
    for workers in (0, 2):
        cfg = helpers.loader_config(uniform_shards, num_workers=workers, chunk_size=3, micro_batch_size=4)
        runs.append(take(ShardLoader(cfg, sp_tok), 14))  # 56 samples: crosses an epoch boundary
    for a, b in zip(*runs):
        assert a["ids"] == b["ids"]
        for key in ("tokens", "labels", "loss_mask", "images", "has_image"):
            assert torch.equal(a[key], b[key]), key


def test_save_restore_gives_the_uninterrupted_sequence(uniform_shards, sp_tok, helpers, tmp_path):
    # Damage two samples so the stream contains skips: counters must resume exactly too.
    damaged = str(tmp_path / "damaged")
    shutil.copytree(uniform_shards, damaged)
    _flip_byte(damaged, "shard-000001.tar", 3)
    _flip_byte(damaged, "shard-000003.tar", 5)
    cfg = helpers.loader_config(damaged, max_skip_rate=0.5, num_workers=2, micro_batch_size=3)
    full = ShardLoader(cfg, sp_tok, rank=1, world_size=2)
    reference = take(full, 20)
    assert full.stats()["skipped"] > 0

    first = ShardLoader(cfg, sp_tok, rank=1, world_size=2)
    head = take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = ShardLoader(helpers.loader_config(damaged, max_skip_rate=0.5, num_workers=0, micro_batch_size=3),
                          sp_tok, rank=1, world_size=2)
    resumed.load_state_dict(state)
    tail = take(resumed, 13)
    assert helpers.ids_of(head + tail) == helpers.ids_of(reference)
    for a, b in zip(head + tail, reference):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["images"], b["images"])
    assert resumed.state_dict() == full.state_dict()

    other = ShardLoader(helpers.loader_config(damaged, seed=8, max_skip_rate=0.5), sp_tok, rank=1, world_size=2)
    with pytest.raises(DataError, match="order"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="world_size"):
        ShardLoader(cfg, sp_tok, rank=1, world_size=3).load_state_dict(state)


def test_weighted_blend_of_shard_sets(uniform_shards, tmp_path, sp_tok, helpers):
    from himix_megatron.data import BuildConfig, build_shards

    records = [{"id": f"b{i}", "conversations": helpers.conv(f"Q{i}?", f"A{i}.")} for i in range(6)]
    path, _ = helpers.write_llava(tmp_path, records, {})
    small = str(tmp_path / "small")
    build_shards(BuildConfig(output=small, json=(path,), maxcount=4, progress=False))

    cfg = helpers.loader_config([DatasetSpec.of(uniform_shards, weight=1.0), DatasetSpec.of(small, weight=1.0)],
                                blend_chunk=10)
    ids = helpers.ids_of(take(ShardLoader(cfg, sp_tok), 30))
    from_small = [i for i in ids if i.startswith("b")]
    assert len(from_small) == 60  # half of 120
    assert sorted(from_small[:6]) == sorted(f"b{i}" for i in range(6))  # exact epochs of the small set

    # Without weights the directories concatenate: one pass = every sample of both once.
    cfg = helpers.loader_config([DatasetSpec.of((uniform_shards, small))], num_samples=54, drop_last=False)
    assert sorted(helpers.ids_of(ShardLoader(cfg, sp_tok))) == sorted(ALL | {f"b{i}" for i in range(6)})

    # `fraction` keeps size-proportional weights but scales one dataset down.
    cfg = helpers.loader_config([DatasetSpec.of(uniform_shards), DatasetSpec.of(small, fraction=0.5)], blend_chunk=51)
    ids = helpers.ids_of(take(ShardLoader(cfg, sp_tok), 51))
    assert Counter(i[0] for i in ids) == {"s": 48 * 4, "b": 3 * 4}


def _flip_byte(directory, tar, sample, where=600):
    """Damage one byte inside a sample's first member's data."""
    with open(os.path.join(directory, tar.replace(".tar", ".meta.json"))) as f:
        offset = json.load(f)["offsets"][sample] + where
    with open(os.path.join(directory, tar), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_member_is_skipped_counted_and_named(uniform_shards, tmp_path, sp_tok, helpers, caplog):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(uniform_shards, damaged)
    _flip_byte(damaged, "shard-000002.tar", 4)  # json data of s24
    _flip_byte(damaged, "shard-000002.tar", 6, where=100)  # tar header of s26
    cfg = helpers.loader_config(damaged, num_samples=48, drop_last=False, max_skip_rate=0.1, skip_rate_min_samples=0)
    loader = ShardLoader(cfg, sp_tok)
    with caplog.at_level(logging.WARNING, logger="himix_megatron.data.loader"):
        ids = helpers.ids_of(loader)
    assert set(ids) == ALL - {"s24", "s26"}
    stats = loader.stats()
    assert stats["skipped"] == 2 and stats["seen"] == 48 and stats["dropped"] == 0
    assert stats["by_shard"] == {f"{damaged}/shard-000002.tar: corrupt shard": 2}
    assert "shard-000002.tar sample 4: checksum mismatch" in caplog.text


def test_skip_rate_abort(uniform_shards, tmp_path, sp_tok, helpers):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(uniform_shards, damaged)
    for j in range(10):
        _flip_byte(damaged, "shard-000001.tar", j)
    # 10 of 48 bad: fine under a 25% limit taken over >= 48 samples (early on, the running rate is higher),
    # fatal under the 1% default.
    cfg = helpers.loader_config(damaged, num_samples=48, drop_last=False, max_skip_rate=0.25, skip_rate_min_samples=48)
    assert len(helpers.ids_of(ShardLoader(cfg, sp_tok))) == 38
    cfg = helpers.loader_config(damaged, num_samples=48, skip_rate_min_samples=20)
    with pytest.raises(DataLoaderAbort, match=r"(?s)skipped \d+ of \d+ samples read, above the limit of 1.0%.*shard-000001.tar"):
        helpers.ids_of(ShardLoader(cfg, sp_tok))


def test_truncated_and_missing_shards(uniform_shards, tmp_path, sp_tok, helpers, caplog):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(uniform_shards, damaged)
    tar = os.path.join(damaged, "shard-000004.tar")  # 8 samples: s40..s47
    with open(os.path.join(damaged, "shard-000004.meta.json")) as f:
        cut = json.load(f)["offsets"][5] + 700
    os.truncate(tar, cut)
    # Found at open: 3 of 48 samples unreadable = 6% > 1% default.
    with pytest.raises(DataLoaderAbort, match=r"(?s)3 of 48 samples.*shard-000004.tar: 3 of 8 samples unreadable \(truncated"):
        ShardLoader(helpers.loader_config(damaged), sp_tok)
    cfg = helpers.loader_config(damaged, max_skip_rate=0.1, skip_rate_min_samples=0, num_samples=48, drop_last=False)
    with caplog.at_level(logging.WARNING):
        loader = ShardLoader(cfg, sp_tok)
        ids = helpers.ids_of(loader)
    assert set(ids) == ALL - {"s45", "s46", "s47"}
    assert loader.stats()["by_shard"] == {f"{tar}: corrupt shard": 3}
    assert "shard-000004.tar: 3 of 8 samples unreadable" in caplog.text

    os.remove(tar)
    with pytest.raises(DataLoaderAbort, match="shard file missing"):
        ShardLoader(helpers.loader_config(damaged), sp_tok)
    with pytest.raises(DataError, match="no index.json"):
        ShardLoader(helpers.loader_config(str(tmp_path)), sp_tok)


def test_too_long_samples_are_dropped_and_counted(uniform_shards, sp_tok, helpers):
    # With 12 tokens, "<s>USER: Question NN? ASSISTANT:" alone fills the window: nothing left to learn.
    cfg = helpers.loader_config(uniform_shards, seq_length=12, num_samples=48, drop_last=False, max_drop_rate=1.0)
    loader = ShardLoader(cfg, sp_tok)
    assert helpers.ids_of(loader) == []
    assert loader.stats()["dropped"] == 48
    with pytest.raises(DataLoaderAbort, match="dropped 2 of 2 samples read, above the limit of 10.0%"):
        take(ShardLoader(helpers.loader_config(uniform_shards, seq_length=12, skip_rate_min_samples=10), sp_tok), 1)
    # Limits switched off and an endless stream: a whole pass with nothing usable still stops.
    with pytest.raises(DataLoaderAbort, match="no usable sample in 49 consecutive"):
        take(ShardLoader(helpers.loader_config(uniform_shards, seq_length=12, max_drop_rate=1.0), sp_tok), 1)
    cfg = helpers.loader_config(uniform_shards, seq_length=40, num_samples=48, drop_last=False)
    batch = next(iter(ShardLoader(cfg, sp_tok)))
    assert batch["tokens"].shape == (4, 40) and (batch["lengths"] <= 40).all()
    assert (batch["loss_mask"].sum(1) > 0).all()


def test_state_is_position_in_rank_stream(uniform_shards, sp_tok, helpers):
    cfg = helpers.loader_config(uniform_shards, shuffle=False, micro_batch_size=2)
    loader = ShardLoader(cfg, sp_tok, rank=1, world_size=3)
    batch = take(loader, 2)
    assert loader.state_dict()["position"] == 4
    assert helpers.ids_of(batch) == [f"s{rank_position(1, 3, k):02d}" for k in range(4)]


def test_pad_to_longest(uniform_shards, sp_tok, helpers):
    batch = next(iter(ShardLoader(helpers.loader_config(uniform_shards, pad_to="longest", seq_length=200), sp_tok)))
    assert batch["tokens"].shape[1] == int(batch["lengths"].max()) < 200
    assert batch["labels"].shape == batch["loss_mask"].shape == batch["tokens"].shape
