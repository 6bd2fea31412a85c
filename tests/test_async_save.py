"""--async-save: the shards are written by a forked writer while training goes on; the checkpoint is renamed
and `latest` moved only once every rank's writer has finished; a writer that dies leaves the previous
checkpoint the latest; training with async saves equals training with synchronous ones."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
import torch

from himix_megatron.checkpoint import CheckpointError, ModelDescription, resolve
from himix_megatron.config import ParallelConfig
from model_utils import TINY_LM, TINY_VISION
from multiprocess import run_world
from test_training import _cfg, _losses, _parallel, _train, synthetic  # noqa: F401  (the fixture)

DESCRIPTION = ModelDescription("himix", TINY_LM, TINY_VISION, "tinyllama")


def _norm_after_load(path) -> float:
    from himix_megatron.checkpoint import build_model, load_checkpoint

    chunks, encoder = build_model(DESCRIPTION, ParallelConfig())
    load_checkpoint(path, chunks, encoder=encoder)
    return float(chunks[0].decoder.final_layernorm.weight[0])


def _latest(save_dir) -> str:
    return open(os.path.join(save_dir, "latest")).read().strip()


def _async_saves_in_two_ranks(save_dir: str) -> dict:
    """Rank 0's writer is slowed down; rank 1's writer of a later save dies by SIGKILL."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from himix_megatron.async_save import AsyncSaves
    from himix_megatron.checkpoint import build_model, save_checkpoint

    rank = torch.distributed.get_rank()
    chunks, encoder = build_model(DESCRIPTION, ParallelConfig())
    weight = chunks[0].decoder.final_layernorm.weight
    saves, seen, completed = AsyncSaves(), {}, []

    def save(iteration):
        save_checkpoint(save_dir, chunks, DESCRIPTION, iteration=iteration, encoder=encoder, async_saves=saves,
                        on_complete=completed.append)

    with torch.no_grad():
        weight.fill_(1.0)
    save_checkpoint(save_dir, chunks, DESCRIPTION, iteration=1, encoder=encoder)  # synchronous

    write = FileSystemWriterAsync.write_preloaded_data_multiproc
    if rank == 0:
        def slow(*args, **kwargs):
            time.sleep(3.0)
            return write(*args, **kwargs)

        FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(slow)
    with torch.no_grad():
        weight.fill_(2.0)
    save(2)
    with torch.no_grad():
        weight.fill_(-7.0)  # training goes on: the checkpoint must still hold 2.0
    seen["done_while_rank0_writes"] = saves.finish(blocking=False)
    seen["latest_while_writing"] = _latest(save_dir)
    seen["tmp_while_writing"] = os.path.isdir(os.path.join(save_dir, ".tmp-iter_0000002"))
    seen["completed_while_writing"] = list(completed)
    seen["done_after_wait"] = saves.finish(blocking=True)
    seen["latest_after_wait"] = _latest(save_dir)
    seen["completed"] = list(completed)
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write)

    if rank == 1:
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)  # the writer dies mid-save, as in a node failure

        FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(killed)
    with torch.no_grad():
        weight.fill_(3.0)
    save(3)
    try:
        saves.finish(blocking=True)
        seen["failure"] = None
    except CheckpointError as e:
        seen["failure"] = str(e)
    seen["latest_after_failure"] = _latest(save_dir)
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write)

    save(4)  # the next save cleans the dead one's debris and completes
    saves.close()
    seen["latest_at_end"] = _latest(save_dir)
    return seen


@pytest.mark.slow
def test_async_save_completes_only_when_every_rank_has_written_and_a_dead_writer_loses_nothing(tmp_path):
    save_dir = str(tmp_path / "run")
    results = run_world(2, ParallelConfig(), _async_saves_in_two_ranks, save_dir)
    for seen in results:
        # Rank 1's writer finished at once, rank 0's is still sleeping: nobody finalizes yet.
        assert seen["done_while_rank0_writes"] is False
        assert seen["latest_while_writing"] == "iter_0000001" and seen["tmp_while_writing"]
        assert seen["completed_while_writing"] == []
        assert seen["done_after_wait"] is True and seen["latest_after_wait"] == "iter_0000002"
        assert seen["completed"] == [os.path.join(save_dir, "iter_0000002")]
        # Rank 1's writer was killed: every rank raises, naming the checkpoint; the previous one stays latest.
        assert seen["failure"] is not None and "iter_0000003" in seen["failure"], seen["failure"]
        assert seen["latest_after_failure"] == "iter_0000002"
        assert seen["latest_at_end"] == "iter_0000004"
    assert not os.path.exists(os.path.join(save_dir, "iter_0000003"))
    assert not os.path.exists(os.path.join(save_dir, ".tmp-iter_0000003"))  # the failed write's debris
    assert sorted(d for d in os.listdir(save_dir) if "iter_" in d) == ["iter_0000001", "iter_0000002",
                                                                         "iter_0000004"]
    [values] = run_world(1, ParallelConfig(), _norm_after_load, os.path.join(save_dir, "iter_0000002"))
    assert values == 2.0  # the value at the save, not the -7.0 written while the save was in flight


@pytest.mark.slow
def test_training_with_async_saves_equals_synchronous_saves_and_resumes_exactly(synthetic, tmp_path):  # noqa: F811
    """DP=2, distributed optimizer, a save after every step: the same losses as synchronous saves, every
    checkpoint complete, and a resume from a middle one (written while later steps ran) is exact."""
    cfg = _cfg(synthetic, global_batch_size=16, use_distributed_optimizer=True, train_iters=6, save_interval=1,
               save=str(tmp_path / "sync"))
    sync = run_world(2, _parallel(cfg), _train, cfg)
    background = dataclasses.replace(cfg, save=str(tmp_path / "async"), async_save=True)
    run = run_world(2, _parallel(cfg), _train, background)
    assert _losses(run[0]) == _losses(sync[0])
    assert _latest(tmp_path / "async") == "iter_0000006" and (tmp_path / "async" / "DONE").exists()
    for i in range(1, 7):
        resolve(str(tmp_path / "async" / f"iter_{i:07d}"))  # verified: manifest, sizes, description
    assert not [d for d in os.listdir(tmp_path / "async") if d.startswith(".tmp-")]
    resumed = run_world(2, _parallel(cfg), _train, dataclasses.replace(
        background, save=str(tmp_path / "resumed"), load=str(tmp_path / "async" / "iter_0000003")))
    assert [h["iteration"] for h in resumed[0]["history"]] == [4, 5, 6]
    torch.testing.assert_close(torch.tensor(_losses(resumed[0]), dtype=torch.float64),
                               torch.tensor(_losses(sync[0])[3:], dtype=torch.float64), atol=1e-6, rtol=0)
