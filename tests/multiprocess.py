"""Run a function on N gloo ranks (torch.multiprocessing spawn) and collect each rank's return value."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp

from himix_megatron.platform import free_port


def _worker(rank, world_size, port, parallel, fn, args, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from himix_megatron import platform

    platform.initialize(parallel)
    try:
        result = fn(*args)
    finally:
        platform.shutdown()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_world(world_size: int, parallel, fn, *args):
    """fn(*args) on every rank after platform.initialize(parallel); returns [result of rank 0, 1, ...]."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), parallel, fn, args, out_dir),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
