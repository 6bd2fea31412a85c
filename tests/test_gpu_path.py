"""What of the GPU path can be checked without CUDA: the spec choice and the refusals before any compute."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import torch

from himix_megatron.model import core_attention


def test_te_spec_needs_transformer_engine_pytorch_not_only_the_core_wheel(monkeypatch):
    from himix_megatron import platform

    monkeypatch.setattr(platform, "_use_gpu", None)  # as before initialize(): follow torch.cuda
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    installed = {"transformer_engine"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace(name=name) if name in installed else None)
    assert not core_attention.te_available()  # the core wheel alone
    installed.add("transformer_engine.pytorch")
    assert core_attention.te_available()
    monkeypatch.setattr(platform, "_use_gpu", False)  # initialize(use_gpu=False): the converters on a GPU node
    assert not core_attention.te_available()
    monkeypatch.setattr(platform, "_use_gpu", None)
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


def test_local_vision_encoder_saves_under_te_fused_norm_names(single_rank):
    """The TE ViT spec fuses each layer's norms into linear_qkv / linear_fc1; the local encoder saves its
    norms under those names, so encoder weights interchange between the specs in both directions."""
    from himix_megatron.config import ParallelConfig, vision_model_preset
    from himix_megatron.model.vision import VisionEncoder, build_vision_config

    vision = vision_model_preset("tiny")
    encoder = VisionEncoder(build_vision_config(vision, ParallelConfig(), use_cpu_initialization=True), vision)
    keys = {t.key for t in encoder.sharded_state_dict(prefix="vision_encoder.").values()}  # the checkpoint's keys
    assert "vision_encoder.decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "vision_encoder.decoder.layers.mlp.linear_fc1.layer_norm_bias" in keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)


class _WithExtraState(torch.nn.Module):
    """What a TE module looks like to load_state_dict: a weight plus an `_extra_state` entry (megatron's local
    linears save a None one under the same key; TE's core attention has one that the local SDPA lacks)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.extra = None

    def get_extra_state(self):
        return {"fp8": "history"}

    def set_extra_state(self, state):
        self.extra = state


def test_te_model_loads_a_local_checkpoint_without_extra_state():
    from himix_megatron.checkpoint import CheckpointError, _load_module, without_extra_state

    sharded = {"model": {"decoder.linear_qkv.weight": 1, "decoder.linear_qkv._extra_state": 2},
               "vision_encoder": {"vision_encoder.x._extra_state": 3, "vision_encoder.x.weight": 4}}
    kept, dropped = without_extra_state(sharded)
    assert dropped == 2
    assert kept == {"model": {"decoder.linear_qkv.weight": 1}, "vision_encoder": {"vision_encoder.x.weight": 4}}

    module = torch.nn.Sequential(_WithExtraState())
    weights = {"0.weight": torch.ones(2)}  # a local checkpoint: no _extra_state
    _load_module(module, weights, strict=True, extra_state_missing=True, what="ckpt")
    assert torch.equal(module[0].weight.detach(), torch.ones(2)) and module[0].extra is None
    import pytest

    with pytest.raises(RuntimeError, match="_extra_state"):  # strict torch loading would refuse it
        _load_module(module, weights, strict=True, extra_state_missing=False, what="ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt: missing keys \['0.weight'\]"):
        _load_module(module, {}, strict=True, extra_state_missing=True, what="ckpt")


def test_gpu_selfcheck_without_a_gpu_says_so_and_passes_nothing():
    import os
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "gpu_selfcheck.py")
    proc = subprocess.run([sys.executable, tool], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert "no GPU on this machine; nothing was checked" in proc.stdout and "PASS" not in proc.stdout
    listed = subprocess.run([sys.executable, tool, "--list"], capture_output=True, text=True, timeout=300).stdout.split()
    assert listed == ["train-resume", "te-vs-local", "attention-flash", "attention-fused", "fp8", "vicuna-width"]
    bad = subprocess.run([sys.executable, tool, "--only", "nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr


def test_gpu_selfcheck_report_format():
    import importlib.util
    import os
    import sys

    spec = importlib.util.spec_from_file_location(
        "gpu_selfcheck", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "gpu_selfcheck.py"))
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    table = tool.render([tool.Row("fp8", "PASS", "|diff| 0.01"), tool.Row("attention-flash sbhd", "FAIL", "x")])
    assert table.splitlines() == [
        "check                | result | figures",
        "---------------------+--------+--------",
        "fp8                  | PASS   | |diff| 0.01",
        "attention-flash sbhd | FAIL   | x",
    ]
    assert tool.LOSS_LINE.match("iteration      3 | loss 5.4961 | lr 3.000e-03").groups() == ("3", "5.4961")


def test_layouts_the_hot_path_cannot_serve_are_refused(single_rank):
    import pytest

    from himix_megatron.config import ConfigError
    from model_utils import build_tiny

    with pytest.raises(ConfigError, match="CUDA graphs are not supported"):
        build_tiny("himix", cuda_graph_impl="local")
    with pytest.raises(ConfigError, match="'hierarchical' reads its vision K/V through the text QKV weight"):
        build_tiny("hierarchical", gradient_accumulation_fusion=True)
