"""HiMix's whole difference from a plain decoder layer (paper section 3.2, Algorithm 1).

Per layer i, with X_v the raw vision-encoder features [N, b, d_v] (the same X_v for every layer) and
h the text hidden states [M, b, d]:

    x        = RMSNorm_v^i(X_v)
    K_v, V_v = x W_K,v^i, x W_V,v^i                    (no RoPE: vision keys have no position)
    Q, K, V  = the layer's usual QKV of h, RoPE on Q and K at text positions 0..M-1
    out      = softmax(Q [K_v; K]^T / sqrt(head_dim)) [V_v; V]     causal, aligned bottom-right

so text query j sees all N vision keys and text keys 0..j. Only text flows through the residual
stream and the MLP. Everything else in the layer is megatron-core's TransformerLayer as specified
by its GPT spec; `himix_layer_spec` swaps only the self-attention module.

The paper's ablations (Fig. 4) are switches of the same module: "hierarchical" gives each layer a
2-layer MLP connector d_v -> d -> d and pushes its output through the layer's own text K/V projection;
"uniform" does the same with one connector shared by all layers (applied once by the model, so each
layer receives width-d features). Neither has RMSNorm_v or dedicated W_K,v / W_V,v.

Tensor parallelism: W_K,v and W_V,v form one column-parallel linear whose output rows are grouped
per query group, [k_g; v_g] for g = 0..G-1, exactly like the text K/V. Each TP rank thus owns the
vision K/V of its own heads, and the only extra communication is in the backward: RMSNorm_v's
weight is replicated on every rank, so its gradient sums over all ranks' rows. The local spec
all-reduces that gradient itself (d_v numbers, model/vision_kv.py, which also skips the input-gradient
GEMM that X_v, frozen, does not need); TE's fused norm-linear all-reduces the gradient w.r.t. the
normalised X_v instead.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

from himix_megatron.model import vision_kv
from himix_megatron.model.common import connector_config, connector_submodules


@dataclass
class MixtureAttentionSubmodules(SelfAttentionSubmodules):
    # RMSNorm_v; IdentityOp where the norm is fused into linear_kv_vision (Transformer Engine).
    vision_norm: Union[ModuleSpec, type] = IdentityOp
    # [W_K,v ; W_V,v], d_v -> 2 * n_kv_heads * head_dim, column-parallel. None: the variants, which use
    # the K/V rows of the layer's own linear_qkv instead.
    linear_kv_vision: Union[ModuleSpec, type, None] = None
    # "hierarchical" only: this layer's connector, d_v -> d -> d.
    vision_connector: Union[ModuleSpec, None] = None


def fp8_row_padding(config, rows: int) -> int:
    """Rows to add to an FP8 GEMM input of `rows` rows: 0 outside FP8, else up to megatron-core's alignment for
    the recipe (16; 32 for mxfp8: training/fp8.py states TE's rules)."""
    if not getattr(config, "fp8", None):
        return 0
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    return -rows % get_fp8_align_size(Fp8Recipe(config.fp8_recipe))


class MixtureAttention(SelfAttention):
    """Self-attention of text queries over [vision K/V ; text K/V] in one softmax."""

    def __init__(self, config, submodules: MixtureAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal_bottom_right, **kwargs):
        super().__init__(config, submodules, layer_number, attn_mask_type, **kwargs)
        if not getattr(config, "vision_hidden_size", 0):
            raise ValueError("MixtureAttention needs config.vision_hidden_size (use HiMixTransformerConfig)")
        # X_v is replicated on every TP rank, never split along the sequence, so the vision branch
        # must not all-gather its input nor mark its norm weight as sequence-parallel.
        vision_config = copy.copy(config)
        vision_config.sequence_parallel = False
        self.vision_norm = build_module(
            submodules.vision_norm, config=vision_config,
            hidden_size=config.vision_hidden_size, eps=config.layernorm_epsilon,
        )  # IdentityOp for the variants
        self.linear_kv_vision = None
        if submodules.linear_kv_vision is not None:
            self.linear_kv_vision = build_module(
                submodules.linear_kv_vision,
                config.vision_hidden_size,
                2 * self.kv_projection_size,
                config=vision_config,
                init_method=config.init_method,
                gather_output=False,
                bias=config.add_bias_linear or config.add_qkv_bias,
                skip_bias_add=False,
                is_expert=False,
                tp_comm_buffer_name="kv_vision",
                tp_group=self.pg_collection.tp,
            )
        self.vision_connector = None
        if submodules.vision_connector is not None:
            self.vision_connector = build_module(
                submodules.vision_connector, config=connector_config(config), input_size=config.vision_hidden_size,
                tp_group=self.pg_collection.tp,
            )
        self.vision_features: Optional[Tensor] = None  # set per call by HiMixTransformerLayer

    def vision_key_value(self, vision_features: Tensor) -> tuple[Tensor, Tensor]:
        """[N, b, width] -> K_v, V_v, each [N, b, groups_per_rank, head_dim]."""
        if vision_features.numel() == 0:
            # The boundary to Transformer Engine: its RMSNorm (nvte_rmsnorm_fwd) raises "Input x is not
            # allocated!" on a zero-element tensor. A micro-batch without images passes no X_v at all.
            raise ValueError(f"layer {self.layer_number}: empty vision features {tuple(vision_features.shape)}; "
                             "a micro-batch with no image must pass vision_features=None")
        n, columns = vision_features.shape[:2]
        pad = fp8_row_padding(self.config, n * columns)
        if pad:
            # FP8 GEMMs take rows in multiples of the recipe's alignment (training/fp8.py), and a mixed batch or a
            # packed row has any number of images: zero rows fill the vision GEMMs' input and are dropped from
            # their output (RMSNorm maps a zero row to zero, so they touch no amax and no weight gradient).
            flat = vision_features.reshape(n * columns, 1, vision_features.shape[-1])
            vision_features = torch.cat([flat, flat.new_zeros(pad, 1, flat.shape[-1])])
        if self.vision_connector is not None:
            # megatron's MLP hands back fc2's bias separately, for fusion into a residual add.
            vision_features, bias = self.vision_connector(vision_features)
            vision_features = vision_features if bias is None else vision_features + bias
        if self.linear_kv_vision is not None and vision_kv.can_fuse(vision_features, self.vision_norm,
                                                                   self.linear_kv_vision):
            # Local spec: one backward GEMM instead of two, since X_v needs no gradient (vision_kv.py).
            mixed = vision_kv.vision_key_value(vision_features, self.vision_norm, self.linear_kv_vision)
        else:
            x = self.vision_norm(vision_features)
            mixed = self.linear_kv_vision(x)[0] if self.linear_kv_vision is not None else self._shared_key_value(x)
        if pad:
            mixed = mixed[:n * columns].reshape(n, columns, mixed.shape[-1])
        mixed = mixed.view(*mixed.shape[:2], self.num_query_groups_per_partition, 2 * self.hidden_size_per_attention_head)
        key, value = mixed.chunk(2, dim=-1)
        return key, value

    def _shared_key_value(self, x: Tensor) -> Tensor:
        """The variants: vision K/V from the K and V rows of this layer's text QKV projection."""
        groups = self.num_query_groups_per_partition
        per_group = self.num_attention_heads_per_partition // groups
        hn = self.hidden_size_per_attention_head
        rows = lambda t: t.view(groups, per_group + 2, hn, *t.shape[1:])[:, per_group:].reshape(-1, *t.shape[1:])  # noqa: E731
        weight, bias = self.linear_qkv.weight, getattr(self.linear_qkv, "bias", None)
        # x is replicated over the TP group; each rank's K/V rows see all of it, so its gradient sums.
        x = tensor_parallel.copy_to_tensor_model_parallel_region(x, group=self.pg_collection.tp)
        return F.linear(x, rows(weight), rows(bias) if bias is not None and bias.numel() else None)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor], key_value_states=None,
                inference_context=None, rotary_pos_emb=None, packed_seq_params=None, **unused):
        if inference_context is not None:
            raise NotImplementedError(
                "HiMix attention does not support megatron inference contexts; generate through the Hugging Face export"
            )
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        rows = packed_seq_params.batch_rows if packed_seq_params is not None else 1
        if rows > 1:  # an unpacked batch attended to as one segment per sample: [M, b, ...] -> [b * M, 1, ...]
            query, key, value = (t.transpose(0, 1).reshape(-1, 1, *t.shape[2:]) for t in (query, key, value))
        if rotary_pos_emb is not None:
            q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            if packed_seq_params is not None:
                # Text positions restart in every segment. Rotating here, before the vision keys join,
                # keeps megatron's thd RoPE (which would count them) out of it.
                q_freqs, k_freqs = q_freqs[packed_seq_params.text_positions], k_freqs[packed_seq_params.text_positions]
            query = apply_rotary_pos_emb(query, q_freqs, config=self.config)
            key = apply_rotary_pos_emb(key, k_freqs, config=self.config)
        vision = None
        if self.vision_features is not None:
            vision = self.vision_key_value(self.vision_features)
        # No mask tensor means the implicit bottom-right causal mask; a tensor (True = masked out) is only
        # needed when some samples of an unpacked batch have no image.
        mask_type = self.attn_mask_type if attention_mask is None else AttnMaskType.arbitrary
        if packed_seq_params is not None:
            # thd: [T, 1, ...] -> [T, ...]; keys in segment order [v_1; t_1; v_2; t_2; ...]
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
            if vision is not None:  # [N, images, g, hn] -> image-major [images * N, g, hn]
                vision = tuple(t.transpose(0, 1).reshape(-1, *t.shape[2:]).to(key.dtype) for t in vision)
                key, value = torch.cat([vision[0], key]), torch.cat([vision[1], value])
            key, value = key[packed_seq_params.kv_order], value[packed_seq_params.kv_order]
        elif vision is not None:
            key = torch.cat([vision[0].to(key.dtype), key], dim=0)
            value = torch.cat([vision[1].to(value.dtype), value], dim=0)
        if self.checkpoint_core_attention and self.training:
            context = self._checkpointed_attention_forward(query, key, value, attention_mask, attn_mask_type=mask_type,
                                                           packed_seq_params=packed_seq_params)
        else:
            context = self.core_attention(query, key, value, attention_mask, attn_mask_type=mask_type,
                                          packed_seq_params=packed_seq_params)
        if packed_seq_params is not None:  # [T, heads * hn] -> [T, 1, ...], or back to [M, b, ...]
            context = context.reshape(rows, -1, context.shape[-1]).transpose(0, 1)
        return self.linear_proj(context)


class HiMixTransformerLayer(TransformerLayer):
    """megatron-core's TransformerLayer, with its `context` (X_v) also given to the self-attention.

    TransformerLayer hands `context` only to cross-attention, but HiMix's vision K/V join the
    self-attention softmax. The block passes `context` as a call argument, including through
    activation recompute, so binding it for exactly the duration of this call stays correct when
    the pipeline schedule interleaves micro-batches.
    """

    def forward(self, *args, context: Optional[Tensor] = None, **kwargs):
        self.self_attention.vision_features = context
        try:
            return super().forward(*args, context=context, **kwargs)
        finally:
            self.self_attention.vision_features = None


def himix_layer_spec(use_te: bool, arch: str = "himix") -> ModuleSpec:
    """megatron-core's GPT layer spec (TE or local) with HiMix's mixture attention swapped in."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

        from himix_megatron.model.te_attention import TEMixtureDotProductAttention

        gpt = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
        # TE's fused norm-linear keeps its own backward, input gradient included: vision_kv.py's
        # GEMM-skipping backward would bypass TE's kernels and FP8 casts, so it serves the local spec only.
        core_attention, vision_norm = TEMixtureDotProductAttention, IdentityOp
        linear_kv_vision = TELayerNormColumnParallelLinear
        keys_map = {}
    else:
        from megatron.core.tensor_parallel import ColumnParallelLinear

        from himix_megatron.model.core_attention import SDPAttention

        gpt = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        core_attention, vision_norm, linear_kv_vision = SDPAttention, gpt.submodules.input_layernorm, ColumnParallelLinear
        # Checkpoints use TE's fused names, so local and TE runs load each other's checkpoints.
        keys_map = {"self_attention.vision_norm.": "self_attention.linear_kv_vision.layer_norm_"}

    if arch != "himix":  # the Fig. 4 variants: shared K/V projection, no RMSNorm_v
        vision_norm, linear_kv_vision, keys_map = IdentityOp, None, {}
    attention = gpt.submodules.self_attention
    mixture = ModuleSpec(
        module=MixtureAttention,
        params={"attn_mask_type": AttnMaskType.causal_bottom_right},
        submodules=MixtureAttentionSubmodules(
            **{f.name: getattr(attention.submodules, f.name) for f in dataclasses.fields(SelfAttentionSubmodules)},
            vision_norm=vision_norm,
            linear_kv_vision=linear_kv_vision,
            vision_connector=ModuleSpec(MLP, submodules=connector_submodules(use_te)) if arch == "hierarchical" else None,
        ),
    )
    mixture.submodules.core_attention = core_attention
    layer = gpt.submodules
    return ModuleSpec(
        module=HiMixTransformerLayer,
        submodules=dataclasses.replace(
            layer,
            self_attention=mixture,
            sharded_state_dict_keys_map={**layer.sharded_state_dict_keys_map, **keys_map},
        ),
    )
