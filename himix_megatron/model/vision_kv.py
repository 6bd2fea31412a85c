"""HiMix's vision K/V, RMSNorm_v fused with W_K,v / W_V,v, with a backward that skips the input gradient.

    y = RMSNorm_v(X_v) W^T + b,   RMSNorm_v(X_v) = xhat * w,   xhat = X_v / rms(X_v)

X_v comes from the frozen vision encoder, so nothing needs dL/dX_v. The only reason autograd computes
the input gradient of the linear, dL/dx = G W (a GEMM as large as the forward), is RMSNorm_v's weight
gradient dL/dw_j = sum_n dL/dx_nj xhat_nj. The same number comes out of the weight-gradient GEMM:

    M = G^T xhat                      [out, d_v]   (the one backward GEMM)
    dL/dW = M * w                     (G^T x with x = xhat * w: scaling columns commutes with the product)
    dL/dw_j = sum_o W_oj M_oj         (sum_n (G W)_nj xhat_nj, reassociated)

so the backward is one GEMM instead of two, plus two elementwise passes over a weight-sized tensor.

Tensor parallelism: W is column-parallel (each rank holds the output rows of its query groups), so a
rank's M and dL/dw only cover its rows. megatron would all-reduce dL/dx over the TP group before the
norm's backward; here the all-reduce moves to dL/dw, d_v numbers instead of N x b x d_v.

Nothing is saved for backward but X_v itself, which every layer shares: xhat is recomputed (one
elementwise pass), where the unfused path keeps each layer's normalised copy of X_v.

Only the local spec uses this. Transformer Engine's TELayerNormColumnParallelLinear fuses RMSNorm_v into
its own kernels (and FP8 casts), which this function would bypass, so the TE spec keeps TE's module and
its input-gradient GEMM.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import layers as tp_layers
from torch import Tensor


class VisionKeyValue(torch.autograd.Function):
    """RMSNorm_v then column-parallel W_K,v / W_V,v; no gradient for X_v. See the module docstring."""

    @staticmethod
    @tp_layers.custom_fwd
    def forward(ctx, features: Tensor, norm_weight: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                gradient_accumulation_fusion: bool, tp_group) -> Tensor:
        # The very calls of torch.nn.RMSNorm and megatron's linear, so the forward is bit-identical.
        x = F.rms_norm(features, (features.shape[-1],), norm_weight, eps)
        output = torch.matmul(x, weight.t())
        if bias is not None:
            output = output + bias
        ctx.save_for_backward(features, norm_weight, weight)
        # As megatron's linear does: kept on ctx rather than saved, so in-place accumulation into it
        # does not trip autograd's version check.
        ctx.main_grad = weight.main_grad if gradient_accumulation_fusion and hasattr(weight, "main_grad") else None
        ctx.eps, ctx.use_bias, ctx.fusion, ctx.tp_group = eps, bias is not None, gradient_accumulation_fusion, tp_group
        return output

    @staticmethod
    @tp_layers.custom_bwd
    def backward(ctx, grad_output: Tensor):
        features, norm_weight, weight = ctx.saved_tensors
        grad_output = grad_output.reshape(-1, grad_output.shape[-1])
        xhat = F.rms_norm(features, (features.shape[-1],), None, ctx.eps).reshape(-1, features.shape[-1])
        m = grad_output.t().matmul(xhat.to(grad_output.dtype))
        # Reduced in fp32 whatever the activations: d_v sums over every output row.
        grad_norm_weight = (m.float() * weight.float()).sum(dim=0)
        if ctx.tp_group is not None and ctx.tp_group.size() > 1:
            torch.distributed.all_reduce(grad_norm_weight, group=ctx.tp_group)
        grad_norm_weight = grad_norm_weight.to(norm_weight.dtype)

        if ctx.fusion:
            main_grad = ctx.main_grad
            main_grad.addcmul_(m.to(main_grad.dtype), norm_weight.to(main_grad.dtype))
            weight.main_grad = main_grad
            if hasattr(weight, "grad_added_to_main_grad"):
                # megatron's convention (tensor_parallel.layers): a dummy gradient keeps DDP's hook on
                # the main thread; the flag tells the hook the main grad already holds it.
                make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
                grad_weight = make(main_grad.shape, dtype=grad_output.dtype, device=grad_output.device)
                weight.grad_added_to_main_grad = True
            else:
                grad_weight = None
        else:
            grad_weight = m.mul_(norm_weight.to(m.dtype))
        grad_bias = grad_output.sum(dim=0) if ctx.use_bias else None
        return None, grad_norm_weight, grad_weight, grad_bias, None, None, None


def vision_key_value(features: Tensor, norm: torch.nn.RMSNorm, linear) -> Tensor:
    """RMSNorm_v + linear_kv_vision (a megatron ColumnParallelLinear) through `VisionKeyValue`."""
    bias = linear.bias if linear.bias is not None and linear.bias.numel() else None
    return VisionKeyValue.apply(features, norm.weight, linear.weight, bias, norm.eps,
                                linear.gradient_accumulation_fusion, linear.tp_group)


def can_fuse(features: Tensor, norm, linear) -> bool:
    """Whether `vision_key_value` computes exactly what `linear(norm(features))[0]` would."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    return (
        type(norm) is torch.nn.RMSNorm
        and norm.weight is not None
        and len(norm.normalized_shape) == 1
        and type(linear) is ColumnParallelLinear
        and not features.requires_grad  # somebody wants dL/dX_v: the unfused path computes it
        and features.dtype == norm.weight.dtype == linear.weight.dtype
        and not linear.sequence_parallel
        and not linear.skip_bias_add
        and not linear.gather_output
        and not linear.explicit_expert_comm
        and not linear.disable_grad_reduce
        and linear.config._cpu_offloading_context is None
        and not linear.config.defer_embedding_wgrad_compute
    )
