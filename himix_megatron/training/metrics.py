"""Training metrics on rank 0: log lines, TensorBoard scalars, a progress bar with ETA, and MFU.

Model FLOPs follow the paper's counting rule (himix_megatron.flops, DESIGN.md section 2), for the
stage's trainable parameters: frozen matmuls need no weight gradient, so pretraining costs less per
sample than finetuning. They are counted at each sample's real text length, never over padding, so
tokens/s, FLOP/s and MFU measure useful work; the padding efficiency (real text tokens over the text
positions the decoder computed) and samples per row show what padding or packing cost. MFU needs a peak: given with --peak-flops, or known for a few GPUs (dense
BF16, per device, from the vendors' data sheets).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

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
    start: float = field(default_factory=time.perf_counter)


class MetricsLogger:
    def __init__(self, *, rank: int, total_iters: int, start_iter: int, world_size: int,
                 peak_flops: Optional[float], tensorboard_dir: Optional[str], progress: bool, log_interval: int):
        self.active = rank == 0
        self.log_interval, self.world_size = log_interval, world_size
        self.peak_flops = peak_flops
        self.window = Window()
        self.writer = self.bar = None
        self.skipped_total = 0
        if not self.active:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                            leave=False)

    def step(self, iteration: int, *, loss_sum: float, label_tokens: float, text_tokens: int, samples: int,
             grad_norm: Optional[float], skipped: bool, lr: float, data_skipped: int, model_flops: float = 0.0,
             computed_tokens: Optional[int] = None, rows: Optional[int] = None) -> None:
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
            self._flush(iteration, lr, data_skipped)

    def _flush(self, iteration: int, lr: float, data_skipped: int) -> None:
        w, self.window = self.window, Window()
        seconds = max(time.perf_counter() - w.start, 1e-9)
        loss = w.loss_sum / w.label_tokens if w.label_tokens else math.nan
        values = {
            "loss": loss, "lr": lr,
            "grad_norm": sum(w.grad_norms) / len(w.grad_norms) if w.grad_norms else math.nan,
            "skipped_steps": self.skipped_total, "skipped_samples": data_skipped,
            "samples_per_s": w.samples / seconds, "tokens_per_s": w.text_tokens / seconds,
            "model_tflops_per_s": w.model_flops / seconds / 1e12,
            # Real text tokens over the text positions computed: what padding costs.
            "padding_efficiency": w.text_tokens / max(w.computed_tokens, 1),
            "samples_per_row": w.samples / max(w.rows, 1),
        }
        if self.peak_flops:
            values["mfu"] = values["model_tflops_per_s"] * 1e12 / (self.peak_flops * self.world_size)
        if not self.active:
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, iteration)
            self.writer.flush()
        text = (f"iteration {iteration:6d} | loss {loss:.4f} | lr {lr:.3e} | grad norm {values['grad_norm']:.3f} | "
                f"skipped steps {self.skipped_total} | skipped samples {data_skipped} | "
                f"{values['samples_per_s']:.1f} samples/s | {values['tokens_per_s']:.0f} tokens/s | "
                f"{values['model_tflops_per_s']:.4f} model TFLOP/s | padding efficiency "
                f"{values['padding_efficiency']:.3f} | {values['samples_per_row']:.2f} samples/row"
                + (f" | MFU {values['mfu']:.1%}" if "mfu" in values else ""))
        self.print(text)

    def scalar(self, name: str, value: float, iteration: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, iteration)
            self.writer.flush()

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
