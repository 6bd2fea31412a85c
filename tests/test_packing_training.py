"""The trainer with packing (flag sets on gloo ranks): the losses equal unpacked training on the same samples,
at TP=1, TP=2 and PP=2 and with activation recompute; resuming a packed run at DP=2 reproduces the uninterrupted losses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from himix_megatron.config import ParallelConfig
from multiprocess import run_world
from test_training import _cfg, _losses, _parallel, _train, assert_resume_is_exact, synthetic  # noqa: F401  (the fixture)

PACKED = dict(packing_seq_length=64, micro_batch_size=1)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["himix", "vanilla"])
def test_packed_training_equals_unpacked(synthetic, arch):  # noqa: F811
    """Same samples per step, so the same losses: the mean over the global batch's label tokens.

    TP=2 starts from the same weights as TP=1; each pipeline stage seeds its own initialisation, so PP=2
    is compared with unpacked training at PP=2."""
    base = _cfg(synthetic, arch=arch, global_batch_size=8, train_iters=4, valid_data_path=[str(synthetic / "valid")])
    [single_rank] = run_world(1, ParallelConfig(), _train, base)
    layouts = [dict(), dict(tensor_model_parallel_size=2)]
    if arch == "himix":  # and activation recompute, whole layers or the core attention only
        layouts += [dict(pipeline_model_parallel_size=2), dict(recompute_granularity="full"),
                    dict(recompute_granularity="selective")]
    for layout in layouts:
        cfg = dataclasses.replace(base, **PACKED, **layout)
        world = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
        reference = single_rank
        if cfg.pipeline_model_parallel_size > 1:
            unpacked = dataclasses.replace(base, **layout)
            reference = run_world(world, _parallel(unpacked), _train, unpacked)[0]
        results = run_world(world, _parallel(cfg), _train, cfg)
        torch.testing.assert_close(torch.tensor(_losses(results[0]), dtype=torch.float64),
                                   torch.tensor(_losses(reference), dtype=torch.float64), atol=2e-5, rtol=0,
                                   msg=f"packed {layout or 'single rank'}")
        # Validation packs too: one answer per segment, the same loss and accuracy.
        assert results[0]["valid_samples"] == reference["valid_samples"] == 300  # the whole validation set
        assert results[0]["valid_loss"] == pytest.approx(reference["valid_loss"], abs=2e-5)
        assert results[0]["valid_accuracy"] == reference["valid_accuracy"]


@pytest.mark.slow
def test_packed_resume_reproduces_the_uninterrupted_run(synthetic, tmp_path):  # noqa: F811
    cfg = _cfg(synthetic, **PACKED, global_batch_size=16, use_distributed_optimizer=True,
               save=str(tmp_path / "run"), save_interval=3, lr_warmup_fraction=0.34)
    assert_resume_is_exact(cfg, tmp_path)
