"""Packing on the data side: row planning, the segment description, packed rows, and the loader's guarantees
(exact resume, the DP split) with packing on."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch

from himix_megatron.data import ShardLoader
from himix_megatron.data.collate import CollateConfig, Sample, collate
from himix_megatron.data.packing import (
    PackingConfig,
    extend_segments,
    pack,
    pack_row,
    plan_rows,
    segment_params,
)


def test_plan_rows_first_fit_decreasing_within_capacity():
    lengths = [30, 50, 20, 60, 10, 40]
    rows = plan_rows(lengths, [True] * 6, PackingConfig(seq_length=64))
    # decreasing: 60 -> r0; 50 -> r1; 40 -> r2; 30 -> r3; 20 -> r2 (60); 10 -> r1 (60)
    assert rows == [[3], [1, 4], [2, 5], [0]]
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert rows == plan_rows(lengths, [True] * 6, PackingConfig(seq_length=64))  # deterministic


def test_plan_rows_caps_images_and_respects_the_buffer():
    lengths, images = [5] * 10, [True] * 8 + [False] * 2
    rows = plan_rows(lengths, images, PackingConfig(seq_length=64, max_images=3))
    assert all(sum(images[i] for i in r) <= 3 for r in rows)
    assert sum(len(r) for r in rows) == 10 and len(rows) == 3  # text-only samples do not count against the cap
    # A buffer of 4 packs samples 0-3, 4-7 and 8-9 separately, never across.
    rows = plan_rows(lengths, images, PackingConfig(seq_length=64, buffer_size=4))
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="a sample of 70 text tokens does not fit a packed row of --packing-seq-length 64"):
        plan_rows([70], [True], PackingConfig(seq_length=64))


def test_segment_params_by_hand():
    # segments: 3 text + image, 2 text without, 2 text + image; N = 4 vision tokens per image
    p = segment_params([3, 2, 2], [True, False, True], vision_tokens=4)
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 7]
    assert p.cu_seqlens_kv.tolist() == [0, 7, 9, 15]
    assert (p.max_seqlen_q, p.max_seqlen_kv) == (3, 7) and isinstance(p.max_seqlen_kv, int)
    assert p.text_positions.tolist() == [0, 1, 2, 0, 1, 0, 1]
    # keys index cat([image 0 (0..3), image 1 (4..7), text (8..14)])
    assert p.kv_order.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 12, 4, 5, 6, 7, 13, 14]
    assert p.text_in_kv.tolist() == [4, 5, 6, 7, 8, 13, 14]
    assert p.num_images == 2 and p.seqlens_kv == (7, 2, 6)
    assert extend_segments(p, 3).text_lengths == (3, 2, 2, 3)


def _sample(n, image, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 50, n + 1)
    targets = np.zeros(n + 1, dtype=bool)
    targets[n // 2:] = True
    img = torch.full((3, 8, 8), float(seed)) if image else None
    return Sample(ids, targets, img, f"id{seed}")


def test_pack_row_concatenates_collated_samples_and_pads_with_a_segment():
    cfg = CollateConfig(seq_length=32, pad_id=0, image_size=8)
    samples = [_sample(5, True, 1), _sample(7, False, 2), _sample(3, True, 3)]
    row = pack_row(samples, cfg, vision_tokens=4)
    alone = [collate([s], CollateConfig(32, 0, "longest", image_size=8)) for s in samples]
    assert row["tokens"].shape == (1, 16)  # 15 tokens rounded up to 8
    for key in ("tokens", "labels", "loss_mask"):
        torch.testing.assert_close(row[key][0, :15], torch.cat([a[key][0] for a in alone]))
    assert row["loss_mask"][0, 15] == 0 and row["tokens"][0, 15] == 0
    assert row["segments"].text_lengths == (5, 7, 3, 1) and row["segments"].has_image == (True, False, True, False)
    assert row["lengths"].tolist() == [5, 7, 3]
    assert torch.equal(row["images"], torch.stack([samples[0].image, samples[2].image]))
    assert row["ids"] == ["id1", "id2", "id3"]


def _packing_cfg(helpers, shards, **kw):
    return helpers.loader_config(shards, micro_batch_size=12, packing=PackingConfig(seq_length=64, vision_tokens=4,
                                                                                    max_images=4), **kw)


def _row_ids(groups):
    return [i for rows in groups for row in rows for i in row["ids"]]


def test_packed_loader_keeps_the_dp_split_and_resumes_exactly(uniform_shards, sp_tok, helpers):
    # DP=2, one epoch (48 samples, groups of 12 per rank): every sample exactly once.
    per_rank = [_row_ids(ShardLoader(_packing_cfg(helpers, uniform_shards, num_samples=48), sp_tok,
                                     rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 24
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"s{i:02d}" for i in range(48))
    for rows in ShardLoader(_packing_cfg(helpers, uniform_shards, num_samples=48), sp_tok):
        for row in rows:
            assert row["tokens"].shape[1] <= 64 and row["segments"].num_images <= 4

    # Resume after 2 groups gives the rows of the uninterrupted run.
    full = list(islice(ShardLoader(_packing_cfg(helpers, uniform_shards), sp_tok, rank=1, world_size=2), 5))
    first = ShardLoader(_packing_cfg(helpers, uniform_shards), sp_tok, rank=1, world_size=2)
    head = list(islice(first, 2))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ShardLoader(_packing_cfg(helpers, uniform_shards), sp_tok, rank=1, world_size=2)
    resumed.load_state_dict(state)
    tail = list(islice(resumed, 3))
    assert _row_ids(head + tail) == _row_ids(full)
    for got, want in zip([r for g in head + tail for r in g], [r for g in full for r in g]):
        assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["images"], want["images"])
        assert got["segments"].text_lengths == want["segments"].text_lengths


def test_pack_uses_every_sample_once():
    cfg = CollateConfig(seq_length=32, pad_id=0, image_size=8)
    samples = [_sample(n, n % 3 != 0, i) for i, n in enumerate([4, 9, 30, 2, 17, 8, 11, 5])]
    rows = pack(samples, cfg, PackingConfig(seq_length=32, vision_tokens=4, max_images=2))
    assert sorted(i for r in rows for i in r["ids"]) == sorted(s.sample_id for s in samples)
    assert sum(r["loss_mask"].sum() for r in rows) == sum(float(s.targets[1:].sum()) for s in samples)


def test_rows_round_up_to_the_row_multiple():
    cfg = CollateConfig(seq_length=32, pad_id=0, image_size=8)
    [row] = pack([_sample(5, True, 1), _sample(6, False, 2)], cfg,
                 PackingConfig(seq_length=64, vision_tokens=4, row_multiple=16))
    assert row["tokens"].shape == (1, 16) and row["segments"].text_lengths == (5, 6, 5)
