"""Validation: loss over label tokens and answer accuracy, through the same pipeline schedule.

A sample counts as answered correctly when the model's argmax is the label at every label position
(the answer and its end-of-turn token). Under teacher forcing that is exactly the condition for
greedy decoding from the prompt to produce the answer and stop, so it is the greedy exact-match
accuracy without running a generation loop through the pipeline.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from himix_megatron import platform
from himix_megatron.parallel.pipeline import MicroBatch, forward_backward
from himix_megatron.training import data as training_data


def _score(vocab_size: int, mb: MicroBatch, logits: torch.Tensor):
    from megatron.core import tensor_parallel

    # Vocab-parallel logits [b, M, V/tp] -> full rows, without the padding columns of the vocabulary.
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., :vocab_size].float()
    label = mb.loss_mask.bool()
    right = (logits.argmax(-1) == mb.labels) | ~label  # [b, M]
    if mb.segments is not None:  # a packed row: one answer per segment (pad segments have no label)
        lengths = list(mb.segments.text_lengths)
        right = torch.stack([r.all() for r in right[0].split(lengths)])
        answered = torch.stack([m.any() for m in label[0].split(lengths)])
    else:
        right, answered = right.all(dim=1), label.any(dim=1)
    correct = right & answered
    loss = F.cross_entropy(logits[label], mb.labels[label], reduction="sum")
    stats = torch.stack([loss, label.sum().float(), correct.sum().float(), answered.sum().float()])
    return loss * 0, label.sum().to(torch.int), {"stats": stats.detach()}


@torch.no_grad()
def evaluate(run, paths: list, metrics=None) -> dict:
    from megatron.core import parallel_state

    for chunk in run.chunks:
        chunk.eval()
    loader = training_data.build_valid_loader(run, paths, run.cfg.eval_iters)
    totals = torch.zeros(4, dtype=torch.float64, device=platform.device())
    vocab = run.description.language.vocab_size
    score = partial(_score, vocab)
    for microbatches in training_data.step_stream(run, loader, finite=True):
        stats = forward_backward(run.chunks, microbatches, run.encoder,
                                 vision_tokens=run.description.vision.num_features, forward_only=True, score=score)
        if stats is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            totals += stats.double().sum(dim=0)
    torch.distributed.all_reduce(totals)
    for chunk in run.chunks:
        chunk.train()
    loss_sum, tokens, correct, answered = totals.tolist()
    result = {"valid_loss": loss_sum / max(tokens, 1), "valid_accuracy": correct / max(answered, 1),
              "valid_samples": int(answered)}
    if metrics is not None:
        metrics.print(f"validation at iteration {run.iteration} | loss {result['valid_loss']:.4f} | "
                      f"accuracy {result['valid_accuracy']:.4f} over {result['valid_samples']} samples")
        metrics.scalar("valid/loss", result["valid_loss"], run.iteration)
        metrics.scalar("valid/accuracy", result["valid_accuracy"], run.iteration)
    return result
