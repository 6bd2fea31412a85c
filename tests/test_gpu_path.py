"""What of the GPU path can be checked without CUDA: the spec choice and the refusals before any compute."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from model_utils import TINY_VISION

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
    assert listed == ["train-resume", "te-vs-local", "attention-flash", "attention-fused", "fp8", "text-only",
                      "vicuna-width"]
    bad = subprocess.run([sys.executable, tool, "--only", "nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr


def _selfcheck_tool():
    import os
    import sys

    spec = importlib.util.spec_from_file_location(
        "gpu_selfcheck", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "gpu_selfcheck.py"))
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    return tool


def test_gpu_selfcheck_report_format():
    tool = _selfcheck_tool()
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


def _losses_and_grads(model, *args, **kwargs):
    model.zero_grad()
    loss = model(*args, **kwargs)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=0)
    for name in set(grads_a) | set(grads_b):  # a module one form never runs has no gradient; the other's is zero
        grad_a, grad_b = grads_a.get(name), grads_b.get(name)
        grad_a = torch.zeros_like(grad_b) if grad_a is None else grad_a
        grad_b = torch.zeros_like(grad_a) if grad_b is None else grad_b
        torch.testing.assert_close(grad_a, grad_b, atol=atol, rtol=1e-4, msg=name)


def test_an_empty_vision_tensor_never_reaches_the_vision_kv(single_rank):
    """Bug 1 of issue 25: on the TE spec, a micro-batch in which no sample has an image handed [N, 0, d_v] to
    TELayerNormColumnParallelLinear (TE's RMSNorm raises on it). The boundary now refuses an empty tensor, and
    such a micro-batch attends to its text alone, on both forms of a mixed batch."""
    from model_utils import build_tiny_himix, tiny_batch

    model = build_tiny_himix()
    attention = model.decoder.layers[0].self_attention
    with pytest.raises(ValueError, match="empty vision features"):
        attention.vision_key_value(torch.zeros(TINY_VISION.num_features, 0, TINY_VISION.hidden_size))
    tokens, positions, vision, labels = tiny_batch(batch=2, text_len=8, seed=7)
    text_only = _losses_and_grads(model, tokens, positions, None, labels=labels)
    assert not any("vision" in name for name in text_only[1])
    for as_segments in (True, False):
        model.mixed_batches_as_segments = as_segments
        for none in (torch.tensor([False, False]), (False, False)):
            _assert_same(_losses_and_grads(model, tokens, positions, vision, labels=labels, image_present=none),
                         text_only)


def test_masks_and_columns_come_from_cpu_flags_without_reading_the_device(single_rank):
    """Issue 25 item 6: a mixed batch's mask, segment columns and micro-batch bookkeeping come from the loader's
    CPU copy of the flags. On the meta device any read of a tensor's values raises, as a GPU read would sync."""
    from himix_megatron.model.common import present_columns, present_flags
    from himix_megatron.model.himix_model import mixture_attention_mask
    from himix_megatron.parallel.pipeline import MicroBatch

    flags = (True, False, True)
    assert present_columns(flags, "meta").device.type == "meta"
    assert present_flags(torch.tensor([True, True])) is None and present_flags([1, 0]) == (True, False)
    assert mixture_attention_mask(4, 3, flags, "meta").device.type == "meta"
    cpu = mixture_attention_mask(4, 3, flags)
    assert cpu[1, 0, -4:, :3].all() and not cpu[0, 0, -1].any()  # imageless sample: its text sees no image

    tokens = torch.zeros(3, 4, dtype=torch.long)
    mb = MicroBatch(tokens, tokens, tokens, tokens.float(), images=torch.zeros(3, 2), image_present=torch.tensor(flags))
    moved = mb.to("meta")
    assert moved.image_present.device.type == "meta"
    assert moved.present == flags and moved.image_count == 3
    text_only = MicroBatch(tokens, tokens, tokens, tokens.float(), images=torch.zeros(3, 2),
                           image_present=torch.zeros(3, dtype=torch.bool)).to("meta")
    assert text_only.image_count == 0
    with pytest.raises(Exception):
        text_only.image_present.tolist()  # what the model used to do on the hot path


def test_a_step_skips_the_encoder_for_micro_batches_without_images(single_rank):
    """The encoder runs only for micro-batches with an image, and the model receives the CPU flags (a tuple),
    not the device tensor, so it never syncs to read them."""
    from model_utils import build_tiny_himix, tiny_batch

    from himix_megatron.parallel.pipeline import MicroBatch, forward_backward

    model = build_tiny_himix()
    seen, encoded = [], []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("image_present"))
        return original(*args, **kwargs)

    model.forward = spy
    batches = []
    for k, present in enumerate(((False, False), (True, False), (True, True))):
        tokens, positions, vision, labels = tiny_batch(batch=2, text_len=8, seed=20 + k)
        batches.append(MicroBatch(tokens, positions, labels, torch.ones_like(labels, dtype=torch.float),
                                  images=vision, image_present=torch.tensor(present)))

    def encode(images):
        encoded.append(images.shape[1])
        return images

    sums = forward_backward([model], batches, encode, vision_tokens=TINY_VISION.num_features)
    assert encoded == [2, 2]  # not the all-text micro-batch
    assert seen == [None, (True, False), None]
    assert torch.isfinite(sums).all()


@pytest.mark.parametrize("capability, te, cudnn, flash, backends", [
    ((9, 0), "2.9.0", (9, 10, 0), False, ["fused"]),  # H100 in NGC 25.11 without flash-attn
    ((9, 0), "2.9.0", (9, 6, 0), False, []),  # padding_causal_bottom_right at any length needs cuDNN 9.7
    ((8, 0), "2.9.0", (9, 10, 0), False, []),  # A100: cuDNN's thd needs sm90, TE 2.9 has no unfused thd
    ((8, 0), "2.10.0", (9, 10, 0), True, ["flash"]),
    ((8, 0), "2.11.0", (9, 10, 0), False, ["unfused"]),
    ((12, 0), "2.9.0", (9, 10, 0), True, ["flash"]),  # sm120: TE disables fused thd
    ((10, 0), "2.11.0", (9, 10, 0), True, ["flash", "fused", "unfused"]),
])
def test_which_te_backends_can_run_thd_segments(capability, te, cudnn, flash, backends):
    assert core_attention.thd_backends(capability, te, cudnn, flash) == backends
    problem = core_attention.thd_problem(capability, te, cudnn, flash)
    assert (problem is None) == bool(backends)
    if problem:
        assert "install flash-attn" in problem and f"compute capability {capability[0]}.{capability[1]}" in problem


def test_without_a_thd_backend_packing_is_refused_and_himix_masks(tmp_path, monkeypatch):
    """Issue 25 item 4: on an Ampere GPU without flash-attn under TE 2.9/2.10 no backend runs thd; the trainer
    says so before step 1 for what needs it, naming the flag and the fix, and HiMix falls back to the mask."""
    from himix_megatron.config import ConfigError
    from himix_megatron.training import trainer
    from himix_megatron.training.config import parse_args

    (tmp_path / "a").mkdir()
    cfg = lambda *extra: parse_args(["--data-path", str(tmp_path / "a"), "--train-iters", "1", *extra])  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(core_attention, "te_available", lambda: True)
    problem = core_attention.thd_problem((8, 0), "2.9.0", (9, 10, 0), False)
    monkeypatch.setattr(core_attention, "gpu_thd_problem", lambda: problem)
    with pytest.raises(ConfigError, match=r"--packing-seq-length: no Transformer Engine attention backend .* install "
                                          r"flash-attn .*; or train unpacked"):
        trainer.thd_attention(cfg("--packing-seq-length", "64"), "himix")
    assert trainer.thd_attention(cfg(), "vanilla") is False  # unpacked vanilla needs no segments (a text-only
    # sample holds no image id, and its image columns trail its text)
    assert trainer.thd_attention(cfg(), "himix") is False  # the caller turns mixed_batches_as_segments off
    monkeypatch.setattr(core_attention, "gpu_thd_problem", lambda: None)
    assert trainer.thd_attention(cfg("--packing-seq-length", "64"), "vanilla") is True
    monkeypatch.setattr(core_attention, "te_available", lambda: False)
    monkeypatch.setattr(core_attention, "gpu_thd_problem", lambda: problem)
    assert trainer.thd_attention(cfg("--packing-seq-length", "64"), "vanilla") is True  # local spec: always


LAUNCHER_ENV = {
    "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NODELIST": "gpu[001-002]",
    "SLURM_JOB_ID": "77", "RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "gpu001",
    "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "PET_NPROC_PER_NODE": "4", "OMPI_COMM_WORLD_SIZE": "4",
    "PMI_SIZE": "4", "MPI_LOCALRANKID": "0",
}


def test_selfcheck_is_one_process_whatever_the_launcher_set(monkeypatch, tmp_path):
    """Bug 3 of issue 25: the self-check's children inherited SLURM / torchrun variables (both attention checks
    bound the parent's MASTER_PORT; under an sbatch with SLURM_NTASKS > 1 the parent waited for ranks that never
    came). Its launch now ignores them: its own world of one on a free port, children in a clean environment."""
    import os
    import subprocess

    from himix_megatron import platform

    tool = _selfcheck_tool()
    for name, value in {**LAUNCHER_ENV, "CUDA_VISIBLE_DEVICES": "3", "NVTE_FLASH_ATTN": "1"}.items():
        monkeypatch.setenv(name, value)
    clean = tool.single_process_env(os.environ)
    assert not set(LAUNCHER_ENV) & set(clean)
    assert clean["CUDA_VISIBLE_DEVICES"] == "3" and clean["PATH"] == os.environ["PATH"]
    assert not set(LAUNCHER_ENV) & set(tool.attention_child_env("fused"))
    assert tool.attention_child_env("fused")["NVTE_FUSED_ATTN"] == "1"

    launched = []
    monkeypatch.setattr(platform, "initialize", lambda parallel, launch=None, **kw: launched.append(launch))
    monkeypatch.setattr("megatron.core.parallel_state.model_parallel_is_initialized", lambda: False)
    tool.init_single_rank()
    [launch] = launched
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (0, 1, 0, "single")
    assert launch.master_addr == "127.0.0.1" and launch.master_port != 29500

    children = []

    def fake_run(cmd, **kwargs):
        children.append((cmd, kwargs["env"]))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tool.subprocess, "run", fake_run)
    assert tool.himix_train(["--train-iters", "1"], str(tmp_path / "log")) == ({}, {})
    [(cmd, env)] = children
    assert "--standalone" in cmd and not set(LAUNCHER_ENV) & set(env)


def test_selfcheck_on_a_nonzero_rank_exits_at_once():
    import os
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "gpu_selfcheck.py")
    env = {**os.environ, **LAUNCHER_ENV, "SLURM_PROCID": "2", "RANK": "2"}
    proc = subprocess.run([sys.executable, tool], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "rank 2 of a multi-process launch" in proc.stdout
    assert "no GPU" not in proc.stdout  # it stopped before looking


def test_selfcheck_skips_backends_the_gpu_cannot_have_and_reports_each_case(monkeypatch, tmp_path):
    """Issue 25 item 4: an impossible backend is a SKIP with its reason, and one failing case does not hide
    the other's result."""
    import subprocess

    tool = _selfcheck_tool()
    ampere = ((8, 0), (9, 10, 0), False)  # an A100 without flash-attn
    assert "flash-attn is not installed" in tool.attention_case_problem("flash", tool.ATTENTION_CASES[0], *ampere)
    assert "thd attention needs sm90+" in tool.attention_case_problem("fused", tool.ATTENTION_CASES[1], *ampere)
    assert tool.attention_case_problem("fused", tool.ATTENTION_CASES[0], *ampere) is None
    assert "needs cuDNN 9.7" in tool.attention_case_problem("fused", tool.ATTENTION_CASES[0], (9, 0), (9, 6, 0), True)
    hopper = ((9, 0), (9, 10, 0), True)
    assert all(tool.attention_case_problem(b, c, *hopper) is None for b in ("flash", "fused")
               for c in tool.ATTENTION_CASES)

    monkeypatch.setattr(tool.subprocess, "run", lambda *a, **k: pytest.fail("nothing to run: every case is a SKIP"))
    rows = tool.check_attention(str(tmp_path), "flash", ampere)
    assert [r.status for r in rows] == ["SKIP", "SKIP"]

    sbhd, thd = tool.ATTENTION_CASES
    log = "\n".join([
        tool.CASE_MARK + sbhd, "[DEBUG] Running with FusedAttention backend (sub-backend 1)",
        tool.CASE_MARK + thd, "Traceback ...", "RuntimeError: cuDNN Error: execution failed",
        tool.RESULT_MARK + '{"%s": {"out": 0.004, "grads": 0.006}, "%s": {"error": "RuntimeError: cuDNN Error"}}'
        % (sbhd, thd)])
    monkeypatch.setattr(tool.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, stdout=log))
    rows = tool.check_attention(str(tmp_path), "fused", hopper)
    assert [(r.check, r.status) for r in rows] == [(f"attention-fused {sbhd}", "PASS"),
                                                   (f"attention-fused {thd}", "FAIL")]
    assert "FusedAttention backend (sub-backend 1)" in rows[0].figures and "cuDNN Error" in rows[1].figures
