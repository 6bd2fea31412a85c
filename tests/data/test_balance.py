"""Data-parallel load balance (data/balance.py) and the balanced packed loader (loader.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from himix_megatron.data import DataError, ShardLoader
from himix_megatron.data.balance import BalanceConfig, SampleCost, assign, imbalance, loads, plan, round_robin
from himix_megatron.data.packing import PackingConfig
from himix_megatron.data.shards import ShardDirectory, ShardReader

COUNT = 60


@pytest.fixture(scope="session")
def varied_shards(tmp_path_factory):
    """60 samples v00..v59 whose answers run from 1 to ~40 words (a long tail), every third text-only."""
    import numpy as np

    from conftest import answer_shards

    rng = np.random.default_rng(3)
    answers = []
    for i in range(COUNT):
        words = int(min(40, rng.pareto(1.2) * 3 + 1))
        answers.append(" ".join(f"w{(i * 7 + k) % 23}" for k in range(words)) + ".")
    return answer_shards(tmp_path_factory.mktemp("varied"), "v", answers, maxcount=16,
                         colour=lambda i: (i * 4, 90, 200 - i))


def balanced_config(helpers, path, *, gbs=12, strategy="balanced", **kw):
    base = dict(micro_batch_size=gbs, packing=PackingConfig(96, vision_tokens=4), seq_length=64,
                balance=BalanceConfig(gbs, strategy=strategy))
    base.update(kw)
    return helpers.loader_config(path, **base)


def take(loader, n):
    out = []
    for item in loader:
        out.append((item, loader.last_plan))
        if len(out) == n:
            break
    return out


def same_plan(a, b):
    """Equal plans (the planning time aside)."""
    return {k: v for k, v in a.items() if k != "plan_seconds"} == {k: v for k, v in b.items() if k != "plan_seconds"}


def ids(step):
    return [i for row in step for i in row["ids"]]


def test_assign_partitions_deterministically_and_beats_round_robin():
    costs = [50.0, 1, 1, 1, 40, 2, 2, 3, 30, 1, 1, 1, 25, 5, 5, 5]
    for world in (1, 2, 4, 16):
        shares = assign(costs, world)
        assert sorted(i for s in shares for i in s) == list(range(len(costs)))
        assert all(s == sorted(s) and s for s in shares)  # stream order; nobody empty while B >= W
        assert shares == assign(list(costs), world)
    # Longest-processing-time: the heaviest rank is within the largest single cost of the mean.
    rank_loads = loads(costs, assign(costs, 4))
    assert max(rank_loads) - sum(rank_loads) / 4 <= max(costs)
    assert imbalance(rank_loads) < imbalance(loads(costs, round_robin(len(costs), 4)))
    # By hand: 50 | 40+1 | 30+5+3+1+1 | 25+5+5+2+2+1+1 = 50 | 41 | 41 | 41: the heaviest holds the 50 alone.
    assert rank_loads == [50.0, 41.0, 41.0, 41.0]
    assert imbalance(rank_loads) == pytest.approx(50 / (173 / 4))
    # Ties go to the lowest rank, equal costs keep stream order: identical costs reproduce round-robin.
    assert assign([1.0] * 8, 4) == round_robin(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert plan(costs, 4, "round-robin") == round_robin(16, 4)
    # Equal counts: 4 each, still far better than round-robin's 50+1+2+5 | 1+40+2+5 | ...
    even = assign(costs, 4, equal_counts=True)
    assert [len(s) for s in even] == [4, 4, 4, 4] and sorted(sum(even, [])) == list(range(16))
    assert imbalance(rank_loads) <= imbalance(loads(costs, even)) < imbalance(loads(costs, round_robin(16, 4)))
    # The balanced plan is never worse than round-robin, batch by batch.
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(300):
        batch = list(rng.pareto(1.5, int(rng.integers(3, 20))) + 0.1)
        world = int(rng.integers(2, 5))
        assert max(loads(batch, plan(batch, world, "balanced"))) <= max(loads(batch, round_robin(len(batch), world)))
    with pytest.raises(ValueError, match="not one of"):
        plan(costs, 4, "random")
    with pytest.raises(ValueError, match="strategy"):
        BalanceConfig(8, strategy="random")
    assert imbalance([0.0, 0.0]) == 1.0


def test_sample_cost_is_the_training_flops_of_flops_py():
    from himix_megatron.config import language_model_preset
    from himix_megatron.flops import training_flops

    lm = language_model_preset("vicuna-7b")
    himix = SampleCost(lm, "himix", 728, 1152, "finetune")
    vanilla = SampleCost(lm, "vanilla", 728, 1152, "finetune", encoder_flops=10**12)
    assert himix(100, True) == training_flops(lm, "himix", 728, 100, "finetune", 1152)
    assert himix(100, False) == training_flops(lm, "himix", 0, 100, "finetune", 1152)
    assert vanilla(100, True) == training_flops(lm, "vanilla", 728, 100, "finetune", 1152) + 10**12
    assert vanilla(100, False) == training_flops(lm, "vanilla", 0, 100, "finetune", 1152)
    assert himix(0, True) == 0.0
    # An image weighs far more in vanilla (728 positions in the sequence) than in HiMix (its K/V per layer).
    assert vanilla(100, True) / vanilla(100, False) > 5 > himix(100, True) / himix(100, False) > 1


def test_read_record_and_text_length_match_the_full_read(varied_shards, sp_tok, helpers):
    directory = ShardDirectory.open(varied_shards)
    reader = ShardReader()
    loader = ShardLoader(balanced_config(helpers, varied_shards), sp_tok)
    for shard in directory.shards:
        for j in range(shard.count):
            full = reader.read(shard, j)
            assert reader.read_record(shard, j) == full.record
            sample = loader.encoder(full, "x", shard.path, j)
            assert loader.encoder.text_length(full.record) == len(sample.ids) - 1


@pytest.mark.parametrize("world", [2, 4])
def test_every_sample_once_per_epoch_and_the_same_global_batches(varied_shards, sp_tok, helpers, world):
    steps = 2 * COUNT // 12  # two epochs
    per_strategy = {}
    for strategy in ("balanced", "round-robin"):
        ranks = [take(ShardLoader(balanced_config(helpers, varied_shards, strategy=strategy), sp_tok,
                                  rank=r, world_size=world), steps) for r in range(world)]
        # Every rank planned the same split of every step.
        for s in range(steps):
            assert all(same_plan(ranks[r][s][1], ranks[0][s][1]) for r in range(world))
        batches = [sorted(i for r in range(world) for i in ids(ranks[r][s][0])) for s in range(steps)]
        for epoch in range(2):
            seen = [i for b in batches[epoch * 5:(epoch + 1) * 5] for i in b]
            assert sorted(seen) == [f"v{i:02d}" for i in range(COUNT)]
        per_strategy[strategy] = (batches, [ranks[0][s][1]["imbalance"] for s in range(steps)])
    # Balancing changes who trains what, never what the step trains on.
    assert per_strategy["balanced"][0] == per_strategy["round-robin"][0]
    balanced, round_robin_ = per_strategy["balanced"][1], per_strategy["round-robin"][1]
    assert all(b <= r + 1e-9 for b, r in zip(balanced, round_robin_))
    assert sum(balanced) < sum(round_robin_)


def test_round_robin_steps_match_the_unbalanced_loader(varied_shards, sp_tok, helpers):
    """--no-data-parallel-balance reads exactly what the packed loader read before balancing existed."""
    for rank in range(2):
        stepped = take(ShardLoader(balanced_config(helpers, varied_shards, strategy="round-robin"), sp_tok,
                                   rank=rank, world_size=2), 6)
        plain = ShardLoader(balanced_config(helpers, varied_shards, micro_batch_size=6, balance=None), sp_tok,
                            rank=rank, world_size=2)
        for (a, _), b in zip(stepped, plain):
            assert ids(a) == ids(b)
            for ra, rb in zip(a, b):
                assert torch.equal(ra["tokens"], rb["tokens"]) and torch.equal(ra["images"], rb["images"])


def test_worker_count_does_not_change_the_steps(varied_shards, sp_tok, helpers):
    runs = [take(ShardLoader(balanced_config(helpers, varied_shards, num_workers=workers), sp_tok,
                             rank=1, world_size=2), 7) for workers in (0, 2)]
    for (a, plan_a), (b, plan_b) in zip(*runs):
        assert same_plan(plan_a, plan_b)
        assert len(a) == len(b)
        for ra, rb in zip(a, b):
            assert ra["ids"] == rb["ids"]
            for key in ("tokens", "labels", "loss_mask", "images", "has_image"):
                assert torch.equal(ra[key], rb[key]), key


def _flip_byte(root, shard, sample, where=600):
    with open(f"{root}/{shard.replace('.tar', '.meta.json')}") as f:
        offset = json.load(f)["offsets"][sample] + where
    with open(f"{root}/{shard}", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_exact_resume_with_skips_and_refusals(varied_shards, sp_tok, helpers, tmp_path):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(varied_shards, damaged)
    _flip_byte(damaged, "shard-000000.tar", 5)  # an image byte: only its owner finds out, from the CRC
    _flip_byte(damaged, "shard-000002.tar", 3)
    cfg = balanced_config(helpers, damaged, max_skip_rate=0.5, num_workers=2)
    totals = {}
    for rank in range(2):
        full = ShardLoader(cfg, sp_tok, rank=rank, world_size=2)
        reference = take(full, 8)  # crosses the epoch boundary (5 steps of 12)
        first = ShardLoader(cfg, sp_tok, rank=rank, world_size=2)
        head = take(first, 3)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["position"] == 36 and state["balance"]["strategy"] == "balanced"
        resumed = ShardLoader(balanced_config(helpers, damaged, max_skip_rate=0.5, num_workers=0), sp_tok,
                              rank=rank, world_size=2)
        resumed.load_state_dict(state)
        tail = take(resumed, 5)
        assert [ids(s) for s, _ in head + tail] == [ids(s) for s, _ in reference]
        for (a, _), (b, _) in zip(head + tail, reference):
            for ra, rb in zip(a, b):
                assert torch.equal(ra["tokens"], rb["tokens"]) and torch.equal(ra["images"], rb["images"])
        assert resumed.state_dict() == full.state_dict()
        totals[rank] = full.stats()
        with pytest.raises(DataError, match="world_size"):
            ShardLoader(cfg, sp_tok, rank=rank, world_size=4).load_state_dict(state)
        off = balanced_config(helpers, damaged, max_skip_rate=0.5, strategy="round-robin")
        with pytest.raises(DataError, match="balance"):
            ShardLoader(off, sp_tok, rank=rank, world_size=2).load_state_dict(state)
    # Over the world, 8 steps of 12 read 96 samples, the two damaged ones (once in each epoch that reached them)
    # skipped by whichever rank owned them.
    assert totals[0]["seen"] + totals[1]["seen"] == 96
    assert totals[0]["skipped"] + totals[1]["skipped"] >= 2


def test_an_empty_share_is_one_pad_row_without_labels(varied_shards, sp_tok, helpers):
    # 3 samples over 4 ranks: the last rank has nothing to train on, and still runs the step.
    cfg = balanced_config(helpers, varied_shards, gbs=3)
    step, summary = take(ShardLoader(cfg, sp_tok, rank=3, world_size=4), 1)[0]
    assert summary["samples"][3] == 0 and len(step) == 1
    assert step[0]["loss_mask"].sum() == 0 and step[0]["lengths"].numel() == 0 and step[0]["ids"] == []


def test_balance_needs_packing(varied_shards, helpers):
    with pytest.raises(DataError, match="balance needs packing"):
        helpers.loader_config(varied_shards, balance=BalanceConfig(12))


def test_even_rows_under_pipeline_parallelism():
    from himix_megatron.data.packing import plan_rows

    lengths, images = [60, 50, 40, 30, 20, 10], [True] * 6
    # First-fit decreasing fills rows: 100 | 100 | 10, padded to 3 x 100 under PP.
    assert plan_rows(lengths, images, PackingConfig(100)) == [[0, 2], [1, 3, 4], [5]]
    # Even rows: as many rows, each 70 long: 3 x 70.
    even = plan_rows(lengths, images, PackingConfig(100, even_rows=True))
    assert even == [[0, 5], [1, 4], [2, 3]]
    assert sorted(i for row in even for i in row) == list(range(6))
    # The image cap still holds, and a single row stays as first-fit made it.
    capped = plan_rows(lengths, images, PackingConfig(100, max_images=2, even_rows=True))
    assert all(len(row) <= 2 for row in capped) and sorted(i for r in capped for i in r) == list(range(6))
    assert plan_rows([10, 20], [False, False], PackingConfig(100, even_rows=True)) == [[0, 1]]


def test_unpacked_steps_group_samples_of_similar_length(varied_shards, sp_tok, helpers):
    """Dynamic padding: a step's 3 micro-batches of 4 hold the same 12 samples, longest with longest."""
    def loader(groups, **kw):
        cfg = helpers.loader_config(varied_shards, micro_batch_size=4, length_groups=groups, pad_to="longest", **kw)
        return ShardLoader(cfg, sp_tok, rank=1, world_size=2)

    plain, grouped = take(loader(1), 12), take(loader(3), 12)
    padded = {"plain": 0, "grouped": 0}
    for k in range(0, 12, 3):
        a, b = [m for m, _ in plain[k:k + 3]], [m for m, _ in grouped[k:k + 3]]
        assert sorted(i for m in a for i in m["ids"]) == sorted(i for m in b for i in m["ids"])
        widths = [int(m["lengths"].max()) for m in b]
        assert widths == sorted(widths, reverse=True)
        assert all(int(x["lengths"].max()) >= int(y["lengths"].min()) for x, y in zip(b, b[1:]))  # no overlap
        assert max(int(m["lengths"].min()) for m in b[:-1]) >= int(b[-1]["lengths"].max())
        padded["plain"] += sum(m["tokens"].numel() for m in a)
        padded["grouped"] += sum(m["tokens"].numel() for m in b)
    assert padded["grouped"] < padded["plain"]
    # Resuming between steps reproduces the uninterrupted stream.
    first = loader(3)
    head = take(first, 6)
    resumed = loader(3, num_workers=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [m["ids"] for m, _ in head + take(resumed, 6)] == [m["ids"] for m, _ in grouped]
    with pytest.raises(DataError, match="length_groups"):
        helpers.loader_config(varied_shards, length_groups=2)  # padded to seq_length: nothing to gain


def test_blends_keep_their_global_batches(varied_shards, uniform_shards, sp_tok, helpers):
    from himix_megatron.data import DatasetSpec

    blend = [DatasetSpec.of(varied_shards, weight=2.0), DatasetSpec.of(uniform_shards, weight=1.0)]
    batches = {}
    for strategy in ("balanced", "round-robin"):
        ranks = [take(ShardLoader(balanced_config(helpers, blend, strategy=strategy, blend_chunk=30), sp_tok,
                                  rank=r, world_size=3), 6) for r in range(3)]
        batches[strategy] = [sorted(i for r in range(3) for i in ids(ranks[r][s][0])) for s in range(6)]
    assert batches["balanced"] == batches["round-robin"]
    mixed = [i for b in batches["balanced"] for i in b]
    assert len(mixed) == 72 and len(set(mixed)) == 72
    assert sum(i.startswith("v") for i in mixed) == 48  # the 2:1 blend, exactly over 72 positions
