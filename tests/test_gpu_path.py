"""What of the GPU path can be checked without CUDA: the spec choice and the refusals before any compute."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import torch

from himix_megatron.model import core_attention


def test_te_spec_needs_transformer_engine_pytorch_not_only_the_core_wheel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    installed = {"transformer_engine"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace(name=name) if name in installed else None)
    assert not core_attention.te_available()  # the core wheel alone
    installed.add("transformer_engine.pytorch")
    assert core_attention.te_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not core_attention.te_available()  # never without a GPU


def test_imageless_samples_as_segments_equal_the_masked_batch(single_rank):
    """The TE spec's mask-free form of a mixed batch (one segment per sample, imageless ones without vision
    keys) gives the masked path's losses and gradients; run here on the local spec."""
    from model_utils import build_tiny_himix, tiny_batch

    model = build_tiny_himix()
    tokens, positions, vision, labels = tiny_batch(batch=3, text_len=8, seed=5)
    present = torch.tensor([True, False, True])
    results = []
    for as_segments in (False, True):
        model.mixed_batches_as_segments = as_segments
        model.zero_grad()
        loss = model(tokens, positions, vision, labels=labels, image_present=present)
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (masked, masked_grads), (segments, segment_grads) = results
    torch.testing.assert_close(segments, masked, atol=1e-5, rtol=0)
    assert set(segment_grads) == set(masked_grads)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(segment_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
