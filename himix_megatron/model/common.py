"""What the HiMix decoder and the vanilla LLaVA baseline share: GPTModel arguments and input checks."""

from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLPSubmodules
from torch import Tensor

from himix_megatron.config import ConfigError, HiMixTransformerConfig, LanguageModelConfig
from himix_megatron.model.core_attention import te_available


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron-LM's padding: a multiple of divisible_by * TP, so every TP shard is equal and aligned.

    Applied when a model is first built; from then on its checkpoints record the padded size
    (HiMixTransformerConfig.padded_vocab_size), so it reloads at any TP that divides it.
    """
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def choose_spec(config: HiMixTransformerConfig, use_te: Optional[bool]) -> bool:
    """Transformer Engine spec or local; refuses what the chosen spec cannot do."""
    use_te = te_available() if use_te is None else use_te
    if not getattr(config, "vision_hidden_size", 0):
        raise ConfigError("config.vision_hidden_size is not set (build it with build_transformer_config)")
    if config.sequence_parallel and not use_te:
        raise ConfigError(
            "sequence_parallel needs the Transformer Engine spec (a GPU with transformer-engine): "
            "megatron-core's local RMSNorm does not support it"
        )
    return use_te


def gpt_model_kwargs(config: HiMixTransformerConfig, lm: LanguageModelConfig) -> dict:
    """GPTModel arguments for a Llama/Qwen2-family decoder described by `lm`."""
    return dict(
        config=config,
        vocab_size=config.padded_vocab_size or padded_vocab_size(lm.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=lm.max_position_embeddings,
        share_embeddings_and_output_weights=lm.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=lm.rotary_base,
        rope_scaling=lm.rope_scaling_factor is not None,
        rope_scaling_factor=lm.rope_scaling_factor or 8.0,
    )


def check_vision_features(vision_features: Tensor, width: int, batch: Optional[int]) -> None:
    """X_v must be [N, b, d_v], sequence-first like every megatron activation."""
    if vision_features.dim() != 3 or vision_features.shape[-1] != width:
        raise ValueError(f"vision_features must be [N, b, d_v={width}], got {tuple(vision_features.shape)}")
    if batch is not None and vision_features.shape[1] != batch:
        raise ValueError(
            f"vision_features batch {vision_features.shape[1]} != input_ids batch {batch} "
            "(vision_features is sequence-first: [N, b, d_v])"
        )


def check_packed_vision_features(vision_features: Tensor, width: int, packed_seq_params) -> None:
    """A packed row's X_v is [N, images, d_v]: one column per segment with an image, in segment order."""
    images, n = packed_seq_params.num_images, packed_seq_params.vision_tokens
    if tuple(vision_features.shape) != (n, images, width):
        raise ValueError(f"vision_features of a packed row must be [N={n}, images={images}, d_v={width}] "
                         f"(one column per segment with an image), got {tuple(vision_features.shape)}")


def present_flags(image_present: Union[Tensor, Sequence[bool], None]) -> Optional[tuple]:
    """A micro-batch's per-sample image flags as Python bools; None when every sample has an image.

    The trainer passes the loader's CPU copy (a tuple, or a CPU tensor), which reads without waiting for the
    GPU; a CUDA tensor costs one device sync, so it serves only hand-written calls.
    """
    if image_present is None:
        return None
    flags = tuple(bool(v) for v in (image_present.tolist() if isinstance(image_present, Tensor) else image_present))
    return None if all(flags) else flags


def present_columns(flags: Sequence[bool], device) -> Tensor:
    """The indices of the samples that have an image, on `device`, copied without a sync (from the CPU flags)."""
    index = torch.tensor([i for i, v in enumerate(flags) if v], dtype=torch.long)
    return index.to(device, non_blocking=True)


def connector_config(config: HiMixTransformerConfig) -> HiMixTransformerConfig:
    """A LLaVA connector's config: 2-layer GELU MLP d_v -> d -> d, with biases, not gated.

    Its input X_v is replicated on every TP rank, never split along the sequence, so it neither gathers
    its input nor reduce-scatters its output.
    """
    c = copy.copy(config)
    c.ffn_hidden_size = config.hidden_size
    c.gated_linear_unit = False
    c.activation_func = F.gelu
    c.bias_activation_fusion = False  # megatron's fused bias-GELU is the tanh approximation; LLaVA's is exact
    c.add_bias_linear = True
    c.sequence_parallel = False
    return c


def connector_submodules(use_te: bool) -> MLPSubmodules:
    if use_te:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    return MLPSubmodules(linear_fc1=tensor_parallel.ColumnParallelLinear, linear_fc2=tensor_parallel.RowParallelLinear)


def build_connector(config: HiMixTransformerConfig, use_te: bool, tp_group):
    """megatron-core's LLaVA projector ("mlp": d_v -> d, GELU, d -> d), tensor-parallel like a MLP."""
    from megatron.core.models.vision.multimodal_projector import MultimodalProjector

    return MultimodalProjector(connector_config(config), connector_submodules(use_te), "mlp",
                               config.vision_hidden_size, tp_group=tp_group)
