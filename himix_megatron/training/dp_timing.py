"""The measured side of data-parallel balance: how unevenly the ranks' forward-backward took.

Each rank's time runs from the start of its forward-backward to the entry of megatron-core's
finalize_model_grads, where the gradient reduction over data parallelism begins: this model replica's own
work (its pipeline and tensor-parallel peers included), without the wait for the slowest replica that the
reduction adds. On a GPU the two ends are CUDA events on the compute stream, since the host runs ahead of the
kernels. The spread is the slowest rank's time over the mean, the measured counterpart of the planner's
imbalance (data/balance.py).
"""

from __future__ import annotations

import time
from typing import Optional

import torch


class ForwardBackwardTimer:
    """`with timer:` around one forward_backward; then `spread()` (collective over the data-parallel group)."""

    def __init__(self, config):
        self.config = config
        self.cuda = torch.cuda.is_available()
        self.seconds: Optional[float] = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self) -> "ForwardBackwardTimer":
        self.finalize, self.end = self.config.finalize_model_grads_func, None
        self.start = self._now()

        def timed(*args, **kwargs):
            if self.end is None:  # the first call; gradient reduction starts here
                self.end = self._now()
            return self.finalize(*args, **kwargs)

        if self.finalize is not None:
            self.config.finalize_model_grads_func = timed
        return self

    def __exit__(self, *exc) -> None:
        self.config.finalize_model_grads_func = self.finalize
        end = self.end if self.end is not None else self._now()
        if self.cuda:
            end.synchronize()
            self.seconds = self.start.elapsed_time(end) / 1000
        else:
            self.seconds = end - self.start

    def spread(self) -> Optional[float]:
        """The slowest data-parallel rank's time over the mean; None without data parallelism."""
        from megatron.core import parallel_state

        from himix_megatron import platform

        group = parallel_state.get_data_parallel_group()
        world = torch.distributed.get_world_size(group)
        if world == 1 or self.seconds is None:
            return None
        mine = torch.tensor([self.seconds], dtype=torch.float64, device=platform.device())
        times = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(times, mine, group=group)
        values = [float(t) for t in times]
        mean = sum(values) / world
        return max(values) / mean if mean > 0 else None
