#!/usr/bin/env python
"""What a checkpoint save costs training, synchronous against --async-save, in one run.

    python tools/bench_async_save.py [--hidden 1024] [--layers 8] [--ratio 728:64] [--steps 4] [--dir DIR]

One rank, the HiMix model of tools/bench.py (megatron DDP + Adam, fp32) training finetune steps on random
SigLIP-sized features. Measured, in order:
  1. `--steps` training steps alone (their median is the step time);
  2. a synchronous save (model + optimizer + scheduler-free state, as himix-train saves): training blocked for
     the whole write;
  3. an async save (himix_megatron/async_save.py): the time training was blocked (planning the save and
     forking the writer), then training steps run while the writer works, each followed by the cheap
     completion check himix-train makes after every step, until the checkpoint is complete.
Training time lost per save = time blocked + the extra time of the steps that overlapped the write (on a
machine with few cores the writer competes with the step for them; on a GPU node it mostly does not).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ratio", default="728:64", help="N:M vision:text tokens per sample")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory, removed)")
    args = p.parse_args(argv)

    import bench
    from himix_megatron import platform
    from himix_megatron.async_save import AsyncSaves
    from himix_megatron.checkpoint import ModelDescription, save_checkpoint
    from himix_megatron.config import ParallelConfig

    platform.initialize(ParallelConfig())
    bench.keep_freed_memory()
    shape = bench.parse_args(["--hidden", str(args.hidden), "--layers", str(args.layers)])
    lm, vision = bench.models(shape)
    n, m = map(int, args.ratio.split(":"))
    ddp, optimizer = bench.build("himix", lm, vision, "fp32")
    data = bench.batch(lm, vision, n, m, 1, "fp32")
    description = ModelDescription("himix", lm, vision)
    root = args.dir or tempfile.mkdtemp(prefix="himix-bench-async-")

    def one_step() -> float:
        return bench.step(ddp, optimizer, data, args.micro_batches)["total"]

    def save(iteration, saves=None):
        start = time.monotonic()
        save_checkpoint(root, [ddp], description, iteration=iteration, optimizer=optimizer, async_saves=saves)
        return time.monotonic() - start

    try:
        one_step()  # warm-up; allocates Adam's state, so the saves below include it
        alone = statistics.median(one_step() for _ in range(args.steps))
        sync_blocked = save(1)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "iter_0000001"))
                   for f in fs)
        saves = AsyncSaves()
        start = time.monotonic()
        async_blocked = save(2, saves)
        overlapped = []
        while saves.pending is not None:
            overlapped.append(one_step())
            saves.finish(blocking=False)
        complete = time.monotonic() - start
        saves.close()
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        platform.shutdown()

    extra = sum(overlapped) - alone * len(overlapped)
    print(f"model: hidden {args.hidden}, {args.layers} layers, {sum(q.numel() for q in ddp.parameters()) / 1e6:.0f} M "
          f"parameters; checkpoint {size / 2**30:.2f} GiB; {torch.get_num_threads()} threads")
    print(f"training step alone: {alone:.2f} s (median of {args.steps})")
    print(f"synchronous save: training blocked {sync_blocked:.2f} s")
    print(f"async save: training blocked {async_blocked:.2f} s; complete after {complete:.2f} s, "
          f"{len(overlapped)} steps ran meanwhile ({statistics.median(overlapped) if overlapped else 0:.2f} s median)")
    lost = async_blocked + max(extra, 0.0)
    print(f"training time lost per save: synchronous {sync_blocked:.2f} s, async {lost:.2f} s "
          f"({sync_blocked / lost:.1f}x less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
