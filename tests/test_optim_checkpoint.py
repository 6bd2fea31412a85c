"""Resuming from a distributed-optimizer checkpoint reproduces the uninterrupted run exactly.

megatron-core's real machinery on 2 gloo ranks (DP=2): DistributedDataParallel with the distributed
optimizer, torch.optim Adam through get_megatron_optimizer, dist_checkpointing save/load. Without
himix_megatron.optim_compat this fails (DESIGN.md section 4, point 5): the load crashes, or after
the crash sites are fixed, Adam's shared `step` silently changes the resumed losses.
"""

import os

import pytest
import torch

from himix_megatron.config import ParallelConfig
from model_utils import build_tiny_himix, tiny_batch
from multiprocess import run_world

STEPS = 6  # K: the uninterrupted run
SAVE_AT = 3  # k: checkpoint after this many steps
# Megatron-LM's default, and the model-space format that reshards over TP/PP (megatron-core's
# default, fully_sharded_model_space, no longer saves in 0.16.1: "flattened_range is not supported").
FORMATS = ("dp_reshardable", "fully_reshardable")


def _build(seed):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = build_tiny_himix(seed=seed)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=False
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0, use_distributed_optimizer=True),
        [ddp],
    )
    return ddp, optimizer


def _train_step(ddp, optimizer, step):
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    # A fixed, seeded stream: two alternating batches per DP rank, so the toy model can fit them.
    tokens, positions, vision, labels = tiny_batch(batch=2, text_len=8, seed=10 * (step % 2) + dp_rank)
    optimizer.zero_grad()
    ddp.zero_grad_buffer()
    loss = ddp(tokens, positions, vision, labels=labels).mean()
    logged = loss.detach().clone()
    loss.backward()
    ddp.finish_grad_sync()  # the reduce-scatter over DP that finalize_model_grads would run
    update_successful, _, _ = optimizer.step()
    assert update_successful
    return logged.item()


def _sharded_state(ddp, optimizer, fmt, is_loading):
    model_sd = ddp.module.sharded_state_dict()
    optim_sd = optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": fmt}
    )
    return {"model": model_sd, "optimizer": optim_sd}


def _uninterrupted(ckpt_root):
    from megatron.core import dist_checkpointing

    ddp, optimizer = _build(seed=0)
    losses = []
    for step in range(STEPS):
        if step == SAVE_AT:
            for fmt in FORMATS:
                path = os.path.join(ckpt_root, fmt)
                if torch.distributed.get_rank() == 0:
                    os.makedirs(path)
                torch.distributed.barrier()
                dist_checkpointing.save(_sharded_state(ddp, optimizer, fmt, is_loading=False), path)
        losses.append(_train_step(ddp, optimizer, step))
    return losses


def _resumed(ckpt_root):
    from megatron.core import dist_checkpointing

    losses = {}
    for fmt in FORMATS:
        ddp, optimizer = _build(seed=99)  # different init: everything must come from the checkpoint
        loaded = dist_checkpointing.load(
            _sharded_state(ddp, optimizer, fmt, is_loading=True), os.path.join(ckpt_root, fmt)
        )
        ddp.module.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        losses[fmt] = [_train_step(ddp, optimizer, step) for step in range(SAVE_AT, STEPS)]
    return losses


@pytest.mark.slow
def test_distributed_optimizer_resume_matches_uninterrupted_run(tmp_path):
    parallel = ParallelConfig()  # TP=1, PP=1: both ranks are data parallel
    full = run_world(2, parallel, _uninterrupted, str(tmp_path))
    resumed = run_world(2, parallel, _resumed, str(tmp_path))
    for rank, (reference, by_format) in enumerate(zip(full, resumed)):
        assert reference[-1] < reference[0] - 0.5  # it trains
        for fmt, losses in by_format.items():
            torch.testing.assert_close(
                torch.tensor(losses, dtype=torch.float64),
                torch.tensor(reference[SAVE_AT:], dtype=torch.float64),
                atol=1e-6, rtol=0, msg=lambda m: f"rank {rank}, {fmt}: resumed losses differ\n{m}",
            )
