"""Training metrics: log lines and a progress bar with ETA on rank 0; TensorBoard and W&B scalars on the last rank
(world size - 1, the rank Megatron-LM's writers live on); MFU.

Model FLOPs follow the paper's counting rule (himix_megatron.flops, DESIGN.md section 2), for the
stage's trainable parameters: frozen matmuls need no weight gradient, so pretraining costs less per
sample than finetuning. They are counted at each sample's real text length, never over padding, so
tokens/s, FLOP/s and MFU measure useful work; the padding efficiency (real text tokens over the text
positions the decoder computed) and samples per row show what padding or packing cost. MFU needs a peak: given with --peak-flops, or known for a few GPUs (dense
BF16, per device, from the vendors' data sheets).

Every value is the same on every rank when a log line is due (the step's statistics are all-reduced, the loader's
skipped and dropped counts summed over the data-parallel ranks), so the rank that prints and the rank that writes
agree. --log-timers-to-tensorboard adds megatron-core's timers (max over ranks, seconds per iteration, at
--timing-log-level) and --log-memory-to-tensorboard the memory of the rank that holds the most, under
Megatron-LM's names.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# Megatron-LM's timers_to_log that this stack runs (megatron-core's schedules, p2p, gradient finalisation and
# optimizer, and the trainer's own), with the level each is recorded at; --timing-log-level picks up to which.
TIMERS = {
    "interval-time": 0, "save-checkpoint": 0,
    "forward-backward": 1, "all-grads-sync": 1, "optimizer": 1, "optimizer-copy-to-main-grad": 1,
    "optimizer-unscale-and-check-inf": 1, "optimizer-clip-main-grad": 1, "optimizer-count-zeros": 1,
    "optimizer-inner-step": 1, "optimizer-copy-main-to-model-params": 1,
    "forward-compute": 2, "backward-compute": 2, "batch-generator": 2, "forward-recv": 2, "forward-send": 2,
    "backward-recv": 2, "backward-send": 2, "forward-send-forward-recv": 2, "forward-send-backward-recv": 2,
    "backward-send-forward-recv": 2, "backward-send-backward-recv": 2,
}

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def detect_peak_flops(configured: Optional[float], fp8: bool) -> Optional[float]:
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for gpu, peak in PEAK_BF16_FLOPS.items():
        if gpu in name:
            return peak * (2 if fp8 else 1)  # Hopper/Ada FP8 tensor cores run at twice BF16
    return None


@dataclass
class Window:
    """Sums over one log interval."""

    loss_sum: float = 0.0
    label_tokens: float = 0.0
    text_tokens: int = 0  # real ones
    computed_tokens: int = 0  # text positions the decoder ran, padding included
    rows: int = 0  # micro-batch rows (packed rows or padded samples)
    samples: int = 0
    model_flops: float = 0.0  # over the real tokens of every sample
    steps: int = 0
    skipped: int = 0
    grad_norms: list = field(default_factory=list)
    dp_imbalance: list = field(default_factory=list)  # per step: the planned heaviest DP rank's cost over the mean
    dp_time_spread: list = field(default_factory=list)  # per step: the slowest DP rank's forward-backward over the mean
    start: float = field(default_factory=time.perf_counter)


def memory_bytes() -> dict:
    """This process's memory under Megatron-LM's names: the CUDA caching allocator's on a GPU, else the resident
    set (the CPU test platform)."""
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        return {"mem-reserved-bytes": stats["reserved_bytes.all.current"],
                "mem-allocated-bytes": stats["allocated_bytes.all.current"],
                "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
                "mem-allocated-count": stats["allocation.all.current"]}
    import resource

    import psutil

    rss = psutil.Process().memory_info().rss
    # The kernel's high-water mark and its resident count are kept apart and can disagree by a few pages.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mem-rss-bytes": rss, "mem-max-rss-bytes": max(rss, peak)}


def _all_reduce(values: list, op=None, group=None) -> list:
    if not torch.distributed.is_initialized():
        return values
    from himix_megatron import platform

    tensor = torch.tensor(values, dtype=torch.float64, device=platform.device())
    torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM, group=group)
    return tensor.tolist()


class MetricsLogger:
    """Call `step` on every rank after every step (a log line's reductions are collectives), `scalar` likewise."""

    def __init__(self, *, rank: int, total_iters: int, start_iter: int, world_size: int,
                 peak_flops: Optional[float], tensorboard_dir: Optional[str], progress: bool, log_interval: int,
                 wandb: Optional[Callable] = None, timers=None, timing_log_level: int = 0, log_memory: bool = False):
        """`wandb`: makes the W&B writer (wandb_run.WandbWriter), called on the writing rank only. `timers`:
        megatron-core's Timers, already handed to the model's and the optimizer's configs."""
        self.active = rank == 0  # prints
        self.writes = rank == world_size - 1  # TensorBoard and W&B
        self.log_interval, self.world_size = log_interval, world_size
        self.peak_flops = peak_flops
        self.window = Window()
        self.writer = self.wandb = self.bar = None
        self.skipped_total = 0
        self.timers, self.log_memory = timers, log_memory
        self.timer_names = [name for name, level in TIMERS.items() if level <= timing_log_level]
        if self.writes and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        if self.writes and wandb is not None:
            self.wandb = wandb()
        if self.timers is not None:
            self.timers("interval-time", log_level=0).start()
        if self.active and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                            leave=False)

    def data_parallel_balance(self, planned: Optional[float], measured: Optional[float]) -> None:
        """The coming step's data-parallel imbalance (data/balance.py): `planned`, the heaviest rank's cost over
        the mean from the cost model; `measured`, the slowest rank's forward-backward time over the mean."""
        if planned is not None:
            self.window.dp_imbalance.append(planned)
        if measured is not None:
            self.window.dp_time_spread.append(measured)

    def step(self, iteration: int, *, loss_sum: float, label_tokens: float, text_tokens: int, samples: int,
             grad_norm: Optional[float], skipped: bool, lr: float, loader_stats: dict, model_flops: float = 0.0,
             computed_tokens: Optional[int] = None, rows: Optional[int] = None) -> None:
        """`loader_stats`: this rank's ShardLoader.stats() (its skipped and dropped counts so far)."""
        w = self.window
        w.steps += 1
        w.samples += samples
        w.text_tokens += text_tokens
        w.computed_tokens += text_tokens if computed_tokens is None else computed_tokens
        w.rows += samples if rows is None else rows
        w.model_flops += model_flops
        if skipped:
            w.skipped += 1
            self.skipped_total += 1
        else:
            w.loss_sum += loss_sum
            w.label_tokens += label_tokens
            if grad_norm is not None:
                w.grad_norms.append(grad_norm)
        if self.bar is not None:
            self.bar.update(1)
        if iteration % self.log_interval == 0:
            self._flush(iteration, lr, loader_stats)

    def _flush(self, iteration: int, lr: float, loader_stats: dict) -> None:
        from megatron.core import parallel_state

        w, self.window = self.window, Window()
        seconds = max(time.perf_counter() - w.start, 1e-9)
        loss = w.loss_sum / w.label_tokens if w.label_tokens else math.nan
        # Each data-parallel rank's loader counts its own samples; its TP / PP peers read the same ones.
        data_skipped, data_dropped = map(int, _all_reduce(
            [loader_stats["skipped"], loader_stats["dropped"]],
            group=parallel_state.get_data_parallel_group() if torch.distributed.is_initialized() else None))
        values = {
            "loss": loss, "lr": lr,
            "grad_norm": sum(w.grad_norms) / len(w.grad_norms) if w.grad_norms else math.nan,
            "skipped_steps": self.skipped_total, "skipped_samples": data_skipped, "dropped_samples": data_dropped,
            "samples_per_s": w.samples / seconds, "tokens_per_s": w.text_tokens / seconds,
            "model_tflops_per_s": w.model_flops / seconds / 1e12,
            # Real text tokens over the text positions computed: what padding costs.
            "padding_efficiency": w.text_tokens / max(w.computed_tokens, 1),
            "samples_per_row": w.samples / max(w.rows, 1),
        }
        if self.peak_flops:
            values["mfu"] = values["model_tflops_per_s"] * 1e12 / (self.peak_flops * self.world_size)
        for key in ("dp_imbalance", "dp_time_spread"):
            if getattr(w, key):
                values[key] = sum(getattr(w, key)) / len(getattr(w, key))
        scalars = {f"train/{key}": value for key, value in values.items()}
        scalars.update(self._timer_and_memory_scalars(w.steps))
        self._write(scalars, iteration)
        if not self.active:
            return
        text = (f"iteration {iteration:6d} | loss {loss:.4f} | lr {lr:.3e} | grad norm {values['grad_norm']:.3f} | "
                f"skipped steps {self.skipped_total} | skipped samples {data_skipped} | "
                f"{values['samples_per_s']:.1f} samples/s | {values['tokens_per_s']:.0f} tokens/s | "
                f"{values['model_tflops_per_s']:.4f} model TFLOP/s | padding efficiency "
                f"{values['padding_efficiency']:.3f} | {values['samples_per_row']:.2f} samples/row"
                + (f" | MFU {values['mfu']:.1%}" if "mfu" in values else "")
                + (f" | DP imbalance {values['dp_imbalance']:.3f}" if "dp_imbalance" in values else "")
                + (f" | DP time spread {values['dp_time_spread']:.3f}" if "dp_time_spread" in values else ""))
        self.print(text)

    def _timer_and_memory_scalars(self, steps: int) -> dict:
        """Megatron-LM's `NAME-time` (seconds per iteration over the interval, the slowest rank's) and `mem-*`
        (the largest over the ranks) scalars; collectives, so on every rank."""
        scalars = {}
        if self.timers is not None:
            self.timers("interval-time").stop()
            # megatron-core's Timers.write() takes only a SummaryWriter or the wandb module; its reduction is
            # the same call (megatron-core is pinned exactly).
            times = self.timers._get_global_min_max_time(self.timer_names, reset=True, barrier=False,
                                                         normalizer=max(steps, 1))
            # Megatron-LM names the interval's time per iteration `iteration-time`.
            scalars.update({"iteration-time" if name == "interval-time" else f"{name}-time": slowest
                            for name, (_, slowest) in times.items()})
            self.timers("interval-time", log_level=0).start()
        if self.log_memory:
            memory = memory_bytes()
            scalars.update(zip(memory, map(int, _all_reduce(list(memory.values()), torch.distributed.ReduceOp.MAX))))
        return scalars

    def _write(self, scalars: dict, iteration: int) -> None:
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, iteration)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, iteration)

    def scalar(self, name: str, value: float, iteration: int) -> None:
        self._write({name: value}, iteration)

    def print(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None
