"""VisionKeyValue (RMSNorm_v + W_K,v / W_V,v without dL/dX_v) against plain autograd, at TP1 and TP2."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from himix_megatron.config import ParallelConfig, language_model_preset
from himix_megatron.model import vision_kv
from model_utils import TINY_VISION, build_tiny, tiny_batch
from multiprocess import run_world

TINY_QWEN2 = language_model_preset("tiny-qwen2")  # QKV bias: the vision K/V get one too


def _vision_branch(model, layer=0):
    attention = model.decoder.layers[layer].self_attention
    return attention.vision_norm, attention.linear_kv_vision


def _inputs(norm, linear, out_features=None, seed=0):
    """X_v, an upstream gradient for the K/V (out_features wide, default the linear's), and non-trivial norm
    weight / bias (ones and zeros would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(TINY_VISION.num_features, 2, TINY_VISION.hidden_size, generator=g) * 3
    grad = torch.randn(features.shape[0], 2, out_features or linear.weight.shape[0], generator=g)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
        if linear.bias is not None:
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=g))
    return features, grad


def _close(got, want, what, tol=1e-6):
    """Equal within tol of the largest entry: fp32 keeps ~7 digits of each sum, whatever its order."""
    assert got.shape == want.shape, what
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert scale > 0, f"{what}: zero gradient proves nothing"
    assert error <= tol * scale, f"{what}: max error {error:.3g} against largest entry {scale:.3g}"


def _grads(params, run, grad):
    for p in params:
        p.grad = None
    out = run()
    out.backward(grad)
    return out.detach(), [p.grad.clone() for p in params]


def _compare(norm, linear, features, grad):
    """(reference output, grads), (fused output, grads) for the norm weight, weight and bias."""
    params = [norm.weight, linear.weight] + ([linear.bias] if linear.bias is not None else [])
    assert vision_kv.can_fuse(features, norm, linear)
    reference = _grads(params, lambda: linear(norm(features))[0], grad)
    fused = _grads(params, lambda: vision_kv.vision_key_value(features, norm, linear), grad)
    return reference, fused


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("lm", [None, TINY_QWEN2], ids=["no-bias", "bias"])
def test_gradients_match_autograd(lm):
    model = build_tiny("himix", lm=lm) if lm is not None else build_tiny("himix")
    norm, linear = _vision_branch(model)
    assert (linear.bias is not None) == (lm is not None)
    features, grad = _inputs(norm, linear)
    (ref_out, ref_grads), (out, grads) = _compare(norm, linear, features, grad)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)  # the same forward calls: bit-identical
    for name, got, want in zip(("norm weight", "weight", "bias"), grads, ref_grads):
        _close(got, want, f"gradient of the {name}")


@pytest.mark.usefixtures("single_rank")
def test_gradient_accumulation_fusion_accumulates_into_main_grad():
    model = build_tiny("himix")
    norm, linear = _vision_branch(model)
    features, grad = _inputs(norm, linear)
    (_, [_, ref_weight_grad]), _ = _compare(norm, linear, features, grad)
    start = torch.randn(linear.weight.shape, generator=torch.Generator().manual_seed(3))
    linear.weight.main_grad = start.clone()
    linear.weight.grad_added_to_main_grad = False
    linear.gradient_accumulation_fusion = True
    try:
        for _ in range(2):  # two micro-batches
            vision_kv.vision_key_value(features, norm, linear).backward(grad)
        assert linear.weight.grad_added_to_main_grad
        _close(linear.weight.main_grad - start, 2 * ref_weight_grad, "accumulated main grad")
    finally:
        linear.gradient_accumulation_fusion = False
        del linear.weight.main_grad, linear.weight.grad_added_to_main_grad


def _tp_gradients(lm, parallel):
    """Every rank: the fused branch's output and gradients, gathered to their TP=1 shapes."""
    from megatron.core import parallel_state

    from model_utils import gather_tp

    rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel.tensor_model_parallel_size
    model = build_tiny("himix", parallel, lm=lm)
    norm, linear = _vision_branch(model)
    # The TP=1 tensors, drawn alike on every rank; each rank keeps its rows (its query groups).
    rows = linear.weight.shape[0] * size
    g = torch.Generator().manual_seed(7)
    full_weight, full_bias = torch.randn(rows, linear.weight.shape[1], generator=g) * 0.1, torch.randn(rows, generator=g)
    features, full_grad = _inputs(norm, linear, out_features=rows)
    with torch.no_grad():
        linear.weight.copy_(full_weight.chunk(size)[rank])
        linear.bias.copy_(full_bias.chunk(size)[rank])
    grad = full_grad.chunk(size, dim=-1)[rank]
    (ref_out, ref_grads), (out, grads) = _compare(norm, linear, features, grad)
    names = ["self_attention.vision_norm.weight", "self_attention.linear_kv_vision.weight",
             "self_attention.linear_kv_vision.bias"]
    params = [norm.weight, linear.weight, linear.bias]
    gather = lambda gs: [gather_tp(n, g, p) for n, g, p in zip(names, gs, params)]  # noqa: E731
    pieces = [torch.empty_like(out) for _ in range(size)]
    torch.distributed.all_gather(pieces, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1), gather(grads), gather(ref_grads)


@pytest.mark.slow
def test_tp2_matches_tp1():
    [(out1, grads1, ref1)] = run_world(1, ParallelConfig(), _tp_gradients, TINY_QWEN2, ParallelConfig())
    for name, got, want in zip(("norm weight", "weight", "bias"), grads1, ref1):
        _close(got, want, f"TP1 vs autograd: {name}")
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    for out2, grads2, ref2 in run_world(2, parallel, _tp_gradients, TINY_QWEN2, parallel):
        _close(out2, out1, "TP2 vs TP1: output")
        for name, got, ref, tp1 in zip(("norm weight", "weight", "bias"), grads2, ref2, grads1):
            # The norm weight's gradient is whole on each rank only through the TP all-reduce.
            _close(got, tp1, f"TP2 vs TP1: {name}")
            _close(got, ref, f"TP2 vs autograd at TP2: {name}")


class _MatmulShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.usefixtures("single_rank")
def test_model_backward_computes_no_vision_input_gradient():
    """The local-spec model takes the fused path: no backward GEMM yields a gradient shaped like X_v."""
    model = build_tiny("himix")
    tokens, positions, vision, labels = tiny_batch()
    loss = model(tokens, positions, vision, labels=labels).sum()
    recorder = _MatmulShapes()
    with recorder:
        loss.backward()
    x_v_rows = (vision.shape[0] * vision.shape[1], vision.shape[2])
    assert recorder.shapes and x_v_rows not in recorder.shapes, recorder.shapes
    norm_grad = model.decoder.layers[0].self_attention.vision_norm.weight.grad
    assert norm_grad is not None and norm_grad.abs().sum() > 0


@pytest.mark.usefixtures("single_rank")
def test_features_that_need_a_gradient_get_it():
    """X_v with requires_grad (not HiMix training, but allowed): the unfused path, same loss and gradients."""
    model = build_tiny("himix")
    tokens, positions, vision, labels = tiny_batch()
    loss = model(tokens, positions, vision, labels=labels).sum()
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    vision = vision.clone().requires_grad_()
    loss2 = model(tokens, positions, vision, labels=labels).sum()
    loss2.backward()
    torch.testing.assert_close(loss2, loss, atol=0, rtol=0)
    assert vision.grad is not None and vision.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        _close(fused[name], p.grad, name)
