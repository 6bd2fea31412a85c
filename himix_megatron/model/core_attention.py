"""Core attention for the local (non-Transformer-Engine) spec, and the TE/local choice.

megatron-core's local DotProductAttention only knows square causal masks, and PyTorch SDPA's
`is_causal=True` is aligned top-left, which would hide every text key from the first text queries
once vision keys are prepended. HiMix needs the causal mask aligned bottom-right, which
`torch.nn.attention.bias.causal_lower_right` gives SDPA directly (it is what flash-attn's
`causal=True` and TE's `causal_bottom_right` do when there are more keys than queries).
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right


def te_available() -> bool:
    """Transformer Engine spec when TE's PyTorch frontend is installed and this process computes on a GPU
    (`platform.gpu_enabled()`); the local spec otherwise.

    TE's core wheel alone (`transformer_engine` without `transformer_engine.pytorch`) has none of the modules
    the spec uses, so finding the top-level package is not enough.
    """
    from himix_megatron import platform

    if not platform.gpu_enabled() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        return importlib.util.find_spec("transformer_engine.pytorch") is not None
    except (ImportError, ValueError):  # a namespace-only or broken install
        return False


def thd_backends(capability: tuple, te_version: str, cudnn_version: tuple, flash_attn: bool) -> list[str]:
    """Which Transformer Engine attention backends can run HiMix's `thd` segments (packed rows, and unpacked
    batches with imageless samples): `padding_causal_bottom_right` with GQA. Read from TE 2.9-2.11:

    - flash: flash-attn 2 (its varlen causal is bottom-right), sm80+, when TE accepts the installed version
      (`FlashAttentionUtils.is_installed`; `flash_attn` here);
    - fused (cuDNN): `thd` only on sm90+ (not sm120), padding_causal_bottom_right from cuDNN 9.6 with every
      max_seqlen a multiple of 64, any lengths from 9.7 (`nvte_get_fused_attn_backend`); GQA in thd from 9.6;
    - unfused: TE 2.9 and 2.10 disable it for `thd` (`get_attention_backend`); 2.11 keeps it (slow: it
      materialises the scores).
    """
    from packaging.version import Version

    found = []
    if flash_attn and tuple(capability) >= (8, 0):
        found.append("flash")
    if tuple(capability) >= (9, 0) and tuple(capability[:1]) != (12,) and tuple(cudnn_version) >= (9, 7):
        found.append("fused")
    if Version(te_version) >= Version("2.11"):
        found.append("unfused")
    return found


def thd_problem(capability: tuple, te_version: str, cudnn_version: tuple, flash_attn: bool) -> Optional[str]:
    """Why no backend can run `thd` attention here, with the fix; None when one can."""
    if thd_backends(capability, te_version, cudnn_version, flash_attn):
        return None
    return (f"no Transformer Engine attention backend runs packed (thd) segments on compute capability "
            f"{capability[0]}.{capability[1]} with TE {te_version} and cuDNN {'.'.join(map(str, cudnn_version))}: "
            "cuDNN's needs sm90+ and cuDNN 9.7, TE before 2.11 disables the unfused one for thd, and flash-attn "
            "is not installed (or not a version TE accepts); install flash-attn (pip install flash-attn "
            "--no-build-isolation), or use TE >= 2.11")


def gpu_thd_problem() -> Optional[str]:
    """`thd_problem` for this process's GPU and Transformer Engine (a GPU machine with TE only)."""
    from importlib.metadata import version

    # backends.py sets FlashAttentionUtils.is_installed on import, when flash-attn's version is one TE accepts.
    import transformer_engine.pytorch.attention.dot_product_attention.backends  # noqa: F401
    from transformer_engine.pytorch.attention.dot_product_attention.utils import FlashAttentionUtils
    from transformer_engine.pytorch.utils import get_cudnn_version

    return thd_problem(torch.cuda.get_device_capability(), version("transformer_engine"), get_cudnn_version(),
                       bool(FlashAttentionUtils.is_installed))


def _segment_lengths(packed_seq_params) -> tuple[list[int], list[int]]:
    """Per-segment query and key lengths, from the Python ints of a SegmentParams when it has them."""
    lengths = getattr(packed_seq_params, "seqlens_q", None)
    if lengths is not None:
        return list(lengths), list(packed_seq_params.seqlens_kv)
    return (packed_seq_params.cu_seqlens_q.diff().tolist(), packed_seq_params.cu_seqlens_kv.diff().tolist())


def packed_sdpa(query: Tensor, key: Tensor, value: Tensor, packed_seq_params, *, dropout: float = 0.0,
                scale: Optional[float] = None) -> Tensor:
    """`thd` attention, causal and aligned bottom-right within each segment: one SDPA call per segment.

    query [T, heads, hn], key/value [K, groups, hn] -> [T, heads * hn]. Segment i's queries see only
    segment i's keys; with more keys than queries (HiMix: [v_i; t_i]) the diagonal is aligned bottom-right,
    which for a square segment (vanilla) is ordinary causal attention. The cost is the sum over segments,
    not quadratic in their number. (Measured on this CPU against one SDPA call with a block-diagonal mask
    over the whole row: tools/bench_packed_attention.py.)
    """
    heads, hn = query.shape[1], query.shape[2]
    q_lengths, kv_lengths = _segment_lengths(packed_seq_params)
    outputs = []
    for q, k, v in zip(query.split(q_lengths), key.split(kv_lengths), value.split(kv_lengths)):
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, s, hn]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                             dropout_p=dropout, scale=scale, enable_gqa=k.shape[1] != heads)
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs).reshape(query.shape[0], heads * hn)


class SDPAttention(MegatronModule):
    """Drop-in for megatron's core attention: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs the Transformer Engine spec")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), SDPA's default

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support attention_bias")
        # Heads differ across TP ranks, so their dropout masks must differ too. Under sequence
        # parallelism the whole block already runs inside the model-parallel RNG fork.
        rng = nullcontext() if self.config.sequence_parallel else tensor_parallel.get_cuda_rng_tracker().fork()
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None:
            if attention_mask is not None:
                raise ValueError("packed sequences take no attention mask: segments define what is visible")
            with rng:
                return packed_sdpa(query, key, value, packed_seq_params, dropout=dropout, scale=self.softmax_scale)
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b, heads, hn = query.shape
        # SDPA wants [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
        elif mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right):
            # For sq == sk both alignments coincide; the lower-right one is correct for both.
            mask = causal_lower_right(sq, key.shape[0])
        else:
            mask = None
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale,
                enable_gqa=k.shape[1] != heads,
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)
