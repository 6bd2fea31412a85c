"""The trainer end to end on gloo ranks: exact resume, reshard on load, NaN skip, abort with checkpoint.

Runs `himix_megatron.training.trainer.train` in spawned processes on tiny synthetic data; the launcher
tests (torchrun multi-node, mpirun, worker kill) drive the same code through the CLI.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from data_utils import synthetic_training_data
from himix_megatron.config import ParallelConfig
from himix_megatron.training.config import TrainConfig
from multiprocess import run_world


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_training_data(tmp_path_factory.mktemp("synthetic"), 400, valid=300, maxcount=100)


def _cfg(synthetic, **overrides) -> TrainConfig:
    base = dict(data_path=[str(synthetic / "train")], tokenizer_model=str(synthetic / "tok"), system_prompt="",
                seq_length=24, micro_batch_size=4, lr=3e-3, train_iters=6, num_workers=0, progress=False,
                log_interval=100)
    base.update(overrides)
    return TrainConfig(**base)


def _parallel(cfg: TrainConfig) -> ParallelConfig:
    return ParallelConfig(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)


def _train(cfg: TrainConfig):
    from himix_megatron.training.trainer import train

    return train(cfg)


def _losses(result) -> list[float]:
    return [h["loss"] for h in result["history"]]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(synthetic, tmp_path):
    """DP=2 with the distributed optimizer and 2 micro-batches per rank: the loader position, optimizer,
    scheduler and RNG all come back, so iterations 4-6 after a resume equal the uninterrupted ones."""
    cfg = _cfg(synthetic, global_batch_size=16, use_distributed_optimizer=True, save=str(tmp_path / "run"),
               save_interval=3, lr_warmup_fraction=0.34)
    assert_resume_is_exact(cfg, tmp_path)


def assert_resume_is_exact(cfg: TrainConfig, tmp_path) -> None:
    """6 iterations at DP=2 with a save at 3; resumed from it, iterations 4-6 equal the uninterrupted ones."""
    full = run_world(2, _parallel(cfg), _train, cfg)
    resumed_cfg = dataclasses.replace(cfg, save=str(tmp_path / "resumed"),
                                      load=str(tmp_path / "run" / "iter_0000003"))
    resumed = run_world(2, _parallel(cfg), _train, resumed_cfg)
    reference = _losses(full[0])
    assert len(reference) == 6 and reference[-1] < reference[0]
    assert [h["iteration"] for h in resumed[0]["history"]] == [4, 5, 6]
    torch.testing.assert_close(torch.tensor(_losses(resumed[0]), dtype=torch.float64),
                               torch.tensor(reference[3:], dtype=torch.float64), atol=1e-6, rtol=0)


def _checkpoint_loss(load_dir: str, synthetic) -> float:
    """Mean label-token loss of a fixed batch under the checkpoint's weights, at this process's layout."""
    from megatron.core import parallel_state

    from himix_megatron.checkpoint import build_model, load_checkpoint, read_description
    from himix_megatron.data import LoaderConfig, ShardLoader, TemplateConfig, load_tokenizer, DatasetSpec
    from himix_megatron.data.image import ImageConfig
    from himix_megatron.parallel.pipeline import forward_backward
    from himix_megatron.training.data import to_microbatch

    description = read_description(load_dir)
    parallel = ParallelConfig(parallel_state.get_tensor_model_parallel_world_size(),
                              parallel_state.get_pipeline_model_parallel_world_size())
    chunks, encoder = build_model(description, parallel)
    load_checkpoint(load_dir, chunks, encoder=encoder)
    loader = ShardLoader(LoaderConfig((DatasetSpec.of(str(synthetic / "valid")),), micro_batch_size=8, seq_length=24,
                                      template=TemplateConfig("tinyllama", system=""), image=ImageConfig(size=56),
                                      shuffle=False, num_workers=0, num_samples=16),
                         load_tokenizer(str(synthetic / "tok")))
    batches = [to_microbatch(b) for b in loader]
    stats = forward_backward(chunks, batches, encoder, vision_tokens=description.vision.num_features,
                             forward_only=True)
    return None if stats is None else float(stats[:, 0].sum() / stats[:, 1].sum())


@pytest.mark.slow
def test_weights_reload_at_another_tensor_and_pipeline_layout(synthetic, tmp_path):
    cfg = _cfg(synthetic, tensor_model_parallel_size=2, train_iters=2, save=str(tmp_path / "tp2"))
    run_world(2, _parallel(cfg), _train, cfg)
    [tp2] = {r for r in run_world(2, ParallelConfig(tensor_model_parallel_size=2), _checkpoint_loss,
                                  cfg.save, synthetic)}
    [tp1] = run_world(1, ParallelConfig(), _checkpoint_loss, cfg.save, synthetic)
    pp2 = [r for r in run_world(2, ParallelConfig(pipeline_model_parallel_size=2), _checkpoint_loss,
                                cfg.save, synthetic) if r is not None]
    assert math.isfinite(tp2)
    assert tp1 == pytest.approx(tp2, abs=1e-5)
    assert pp2 == [pytest.approx(tp2, abs=1e-5)]


def _weights(load_dir: str) -> dict:
    from himix_megatron.checkpoint import build_model, load_checkpoint, read_description

    chunks, encoder = build_model(read_description(load_dir), ParallelConfig())
    load_checkpoint(load_dir, chunks, encoder=encoder)
    return {k: v.clone() for k, v in chunks[0].state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_a_nan_step_is_skipped_and_too_many_abort_with_a_checkpoint(synthetic, tmp_path):
    # Iteration 3 is poisoned: no update happens, so the weights after 3 iterations equal those after 2.
    poisoned = _cfg(synthetic, train_iters=3, inject_nan_at=[3], save=str(tmp_path / "poisoned"))
    [result] = run_world(1, ParallelConfig(), _train, poisoned)
    assert [h["skipped"] for h in result["history"]] == [False, False, True]
    assert result["skipped_steps"] == 1
    # Same schedule (3 iterations), stopped after 2.
    clean = dataclasses.replace(poisoned, exit_interval=2, inject_nan_at=[], save=str(tmp_path / "clean"))
    run_world(1, ParallelConfig(), _train, clean)
    [after_skip] = run_world(1, ParallelConfig(), _weights, poisoned.save)
    [before] = run_world(1, ParallelConfig(), _weights, clean.save)
    for name, value in before.items():
        assert torch.equal(after_skip[name], value), name

    aborting = _cfg(synthetic, train_iters=6, inject_nan_at=[2, 3], max_bad_steps=2, save=str(tmp_path / "abort"))
    with pytest.raises(Exception, match="2 consecutive steps with a NaN/Inf"):
        run_world(1, ParallelConfig(), _train, aborting)
    assert open(os.path.join(aborting.save, "latest")).read().strip() == "iter_0000003"
    [saved] = run_world(1, ParallelConfig(), _weights, aborting.save)
    assert all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.slow
def test_bf16_with_the_distributed_optimizer_trains(synthetic, tmp_path):
    """bf16 weights and activations, fp32 main parameters and gradients (megatron's mixed precision)."""
    cfg = _cfg(synthetic, bf16=True, use_distributed_optimizer=True, global_batch_size=16, train_iters=8,
               recompute_granularity="full")
    results = run_world(2, _parallel(cfg), _train, cfg)
    losses = _losses(results[0])
    assert all(math.isfinite(x) for x in losses) and not any(h["skipped"] for h in results[0]["history"])
    assert sum(losses[-3:]) < sum(losses[:3])
    assert _losses(results[1]) == losses  # every rank logs the same global-batch loss
