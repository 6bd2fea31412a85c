"""Transformer Engine core attention for HiMix's packed rows (GPU only; imported by the TE spec).

megatron-core 0.16.1's `TEDotProductAttention` maps only causal -> padding_causal for the `thd` layout,
and its `AttnMaskType` has no `padding_causal_bottom_right`. HiMix's packed segments have more keys than
queries ([v_i ; t_i] against t_i), so each segment's diagonal must be aligned bottom-right from its own
query and key lengths, which is TE's `padding_causal_bottom_right`. Unpacked batches keep megatron's path
(`causal_bottom_right`, or `arbitrary` with an explicit mask).

Backends (TE 2.9-2.11): flash-attn serves `thd` with this mask (its varlen `causal=True` is bottom-right per
segment since 2.1); cuDNN's fused attention serves it from cuDNN 9.6 on sm90+. Rows carry no padding between
segments (the pad is a segment of its own), which FlashAttention requires, and max_seqlen_q/kv are Python
ints from the data loader, so TE never syncs with the GPU to find them.
"""

from __future__ import annotations

import transformer_engine.pytorch as te
from megatron.core.extensions.transformer_engine import TEDotProductAttention


class TEMixtureDotProductAttention(TEDotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                packed_seq_params=None, num_splits=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias=attention_bias, num_splits=num_splits)
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("packed rows take neither an attention mask nor a bias: segments define visibility")
        p = packed_seq_params
        # TE's own forward, bypassing megatron's mask-type remapping (which would make it top-left causal).
        return te.DotProductAttention.forward(
            self, query, key, value, None,
            qkv_format="thd",
            cu_seqlens_q=p.cu_seqlens_q,
            cu_seqlens_kv=p.cu_seqlens_kv,
            max_seqlen_q=int(p.max_seqlen_q),
            max_seqlen_kv=int(p.max_seqlen_kv),
            attn_mask_type="padding_causal_bottom_right",
        )
