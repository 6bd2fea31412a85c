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


def test_segment_params_with_image_slots_by_hand():
    """Vanilla: each segment's image id is replaced by its N image tokens where it sits, the id itself moved to the
    segment's end; lengths stay m + N, and the id's output is the last image token's."""
    p = segment_params([4, 2, 3], [True, False, True], vision_tokens=2, image_slots=[1, None, 0])
    assert p.cu_seqlens_kv.tolist() == [0, 6, 8, 13] and p.seqlens_kv == (6, 2, 5)
    # keys index cat([image 0 (0, 1), image 1 (2, 3), text (4..12)])
    assert p.kv_order.tolist() == [4, 0, 1, 6, 7, 5, 8, 9, 2, 3, 11, 12, 10]
    assert p.text_in_kv.tolist() == [0, 2, 3, 4, 6, 7, 9, 10, 11]
    assert p.text_positions.tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert extend_segments(p, 3).image_slots == (1, None, 0, None)
    with pytest.raises(ValueError, match=r"image_slots \(1, 0, 0\): one position inside its text per segment"):
        segment_params([4, 2, 3], [True, False, True], vision_tokens=2, image_slots=[1, 0, 0])
    with pytest.raises(ValueError, match="image_slots"):
        segment_params([4, 2, 3], [True, False, True], vision_tokens=2, image_slots=[4, None, 0])


def test_pack_row_finds_each_samples_image_id():
    from himix_megatron.data.templates import IMAGE_TOKEN_INDEX

    cfg = CollateConfig(seq_length=32, pad_id=0, image_size=8)
    samples = [_sample(5, True, 1), _sample(7, False, 2), _sample(3, True, 3)]
    samples[0].ids[2] = samples[2].ids[0] = IMAGE_TOKEN_INDEX
    row = pack_row(samples, cfg, vision_tokens=4)
    assert row["segments"].image_slots == (2, None, 0, None)  # the last segment pads the row to 16
    samples[1].ids[3] = IMAGE_TOKEN_INDEX
    with pytest.raises(ValueError, match=r"sample id2: 1 image ids \(-200\) in its input tokens without an image"):
        pack_row(samples, cfg, vision_tokens=4)


def test_vanilla_loader_marks_the_image_and_drops_an_image_truncation_cut_off(uniform_shards, sp_tok, helpers):
    """The loader of a vanilla run keeps one image id where the template puts it (after `USER: `), none in a
    text-only sample; when --seq-length cuts the image id off (or leaves it last), the sample trains as text."""
    from himix_megatron.data import TemplateConfig
    from himix_megatron.data.templates import IMAGE_TOKEN_INDEX
    from himix_megatron.training import data as training_data
    from himix_megatron.training.config import TrainConfig

    mark = TemplateConfig("tinyllama", image="mark", system="")
    batch = next(iter(ShardLoader(helpers.loader_config(uniform_shards, template=mark, shuffle=False,
                                                        micro_batch_size=3), sp_tok)))
    slots = (batch["tokens"] == IMAGE_TOKEN_INDEX).sum(1).tolist()
    assert slots == [int(v) for v in batch["has_image"].tolist()] == [1, 1, 0]
    header = sp_tok.encode_chunk("USER: ")[0]
    assert batch["tokens"][0, :len(header) + 1].tolist() == header + [IMAGE_TOKEN_INDEX]
    # The image in the second question: a --seq-length that ends before it, or right after it, keeps the first
    # answer and no image.
    from himix_megatron.data.image import ImageConfig
    from himix_megatron.data.loader import SampleEncoder
    from himix_megatron.data.shards import ShardSample
    from conftest import conv, png_bytes

    record = {"id": "x", "has_image": True, "conversations": conv("Hello?", "Hi.", "<image>\nAnd this?", "A dog.")}
    sample = ShardSample("x", record, png_bytes(), "png")
    full = SampleEncoder(sp_tok, mark, ImageConfig(size=16), 200)(sample, "x")
    at = list(full.ids).index(IMAGE_TOKEN_INDEX)
    assert full.image is not None and at > len(header) + 3
    for seq_length in (at, at + 1):  # the image id cut off; the image id last
        short = SampleEncoder(sp_tok, mark, ImageConfig(size=16), seq_length)(sample, "x")
        assert short.image is None and IMAGE_TOKEN_INDEX not in short.ids and list(short.ids) == list(full.ids[:at])
    # The trainer's loader chooses the placement by arch.
    cfg = TrainConfig(data_path=[uniform_shards], tokenizer_model="t", template="tinyllama", arch="vanilla")
    vision = __import__("himix_megatron.config", fromlist=["x"]).vision_model_preset("tiny")
    assert training_data.loader_config(cfg, "tinyllama", vision).template.image == "mark"
    assert training_data.loader_config(cfg, "tinyllama", vision, arch="himix").template.image == "remove"


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
