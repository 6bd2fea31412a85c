"""Typed model and parallelism configs, the presets, and the checks that run before any compute.

A HiMix model is fully described by three small dataclasses: the language decoder, the vision
encoder whose features feed it, and how it is split over ranks. `build_transformer_config`
turns them into the megatron-core `TransformerConfig` that every module reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

Arch = Literal["himix", "vanilla", "uniform", "hierarchical"]
ARCHS: tuple[str, ...] = ("himix", "vanilla", "uniform", "hierarchical")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the offending field."""


@dataclass(frozen=True)
class LanguageModelConfig:
    """A Llama/Qwen2-family decoder (RMSNorm, SwiGLU, RoPE, GQA)."""

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    norm_epsilon: float
    tie_embeddings: bool
    qkv_bias: bool
    # Llama-3.1-style frequency scaling factor (Llama-3.2 uses 32); None means plain RoPE.
    rope_scaling_factor: Optional[float] = None
    head_dim: Optional[int] = None  # defaults to hidden_size // num_attention_heads

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        """Width of one K (or V) projection: n_kv_heads * head_dim."""
        return self.num_query_groups * self.kv_channels


@dataclass(frozen=True)
class VisionModelConfig:
    """A SigLIP-style ViT. HiMix consumes its penultimate-layer patch features."""

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    image_size: int
    patch_size: int
    norm_epsilon: float

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_features(self) -> int:
        """Vision tokens fed to the decoder: every patch but the first (27*27-1 = 728 for SigLIP-384)."""
        return self.num_patches - 1


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False


LANGUAGE_MODELS: dict[str, LanguageModelConfig] = {
    c.name: c
    for c in [
        # Tiny but structurally complete: GQA (4 heads, 2 groups), untied, no bias; 4 layers so PP=4 works.
        LanguageModelConfig("tiny", 64, 4, 4, 2, 128, 256, 512, 10000.0, 1e-5, False, False),
        LanguageModelConfig("tiny-qwen2", 64, 4, 4, 2, 128, 256, 512, 1e6, 1e-6, True, True),
        LanguageModelConfig("qwen2-0.5b", 896, 24, 14, 2, 4864, 151936, 32768, 1e6, 1e-6, True, True),
        LanguageModelConfig("tinyllama-1.1b", 2048, 22, 32, 4, 5632, 32000, 2048, 10000.0, 1e-5, False, False),
        LanguageModelConfig(
            "llama3.2-1b", 2048, 16, 32, 8, 8192, 128256, 131072, 500000.0, 1e-5, True, False,
            rope_scaling_factor=32.0,
        ),
        LanguageModelConfig(
            "llama3.2-3b", 3072, 28, 24, 8, 8192, 128256, 131072, 500000.0, 1e-5, True, False,
            rope_scaling_factor=32.0,
        ),
        LanguageModelConfig("vicuna-7b", 4096, 32, 32, 32, 11008, 32000, 4096, 10000.0, 1e-5, False, False),
    ]
}

VISION_MODELS: dict[str, VisionModelConfig] = {
    c.name: c
    for c in [
        VisionModelConfig("tiny", 48, 2, 4, 96, image_size=56, patch_size=14, norm_epsilon=1e-6),
        # The CPU demo's encoder. It stays frozen and random, so the pixels' information must survive a
        # random projection: 14 px patches (588 values) into 384 dimensions, 63 tokens of a 112 px image.
        # A shape-only attention probe on its frozen features reached 0.95 held-out accuracy in 400
        # steps (width 192: 0.78; "tiny", 14 px patches of a 56 px image: 0.60 after 1000).
        VisionModelConfig("tiny-112", 384, 2, 4, 768, image_size=112, patch_size=14, norm_epsilon=1e-6),
        VisionModelConfig("siglip-so400m-384", 1152, 27, 16, 4304, image_size=384, patch_size=14, norm_epsilon=1e-6),
    ]
}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ConfigError(f"unknown {what} preset {name!r}; choose one of {sorted(table)}")
    return table[name]


def language_model_preset(name: str) -> LanguageModelConfig:
    return _lookup(LANGUAGE_MODELS, name, "language model")


def vision_model_preset(name: str) -> VisionModelConfig:
    return _lookup(VISION_MODELS, name, "vision model")


def validate(lm: LanguageModelConfig, parallel: ParallelConfig, arch: str = "himix") -> None:
    """Refuse combinations that cannot be built, before anything is allocated."""
    if arch not in ARCHS:
        raise ConfigError(f"arch={arch!r} is not one of {list(ARCHS)}")
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size
    for field, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if value < 1:
            raise ConfigError(f"{field}={value} must be >= 1")
    if lm.num_attention_heads % lm.num_query_groups:
        raise ConfigError(
            f"{lm.name}: num_attention_heads={lm.num_attention_heads} is not a multiple of "
            f"num_query_groups={lm.num_query_groups}"
        )
    if lm.num_attention_heads % tp:
        raise ConfigError(
            f"tensor_model_parallel_size={tp} does not divide {lm.name}'s "
            f"num_attention_heads={lm.num_attention_heads}"
        )
    if lm.num_query_groups % tp:
        raise ConfigError(
            f"tensor_model_parallel_size={tp} does not divide {lm.name}'s num_query_groups="
            f"{lm.num_query_groups} (vision and text K/V are sharded by query group)"
        )
    if lm.ffn_hidden_size % tp:
        raise ConfigError(
            f"tensor_model_parallel_size={tp} does not divide {lm.name}'s ffn_hidden_size={lm.ffn_hidden_size}"
        )
    stages = pp * (vpp or 1)
    if lm.num_layers % stages:
        raise ConfigError(
            f"pipeline_model_parallel_size={pp}"
            + (f" x virtual_pipeline_model_parallel_size={vpp}" if vpp else "")
            + f" does not divide {lm.name}'s num_layers={lm.num_layers}"
        )
    if vpp is not None and pp < 2:
        raise ConfigError("virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2")
    if parallel.sequence_parallel and tp < 2:
        raise ConfigError("sequence_parallel needs tensor_model_parallel_size >= 2")


@dataclass
class HiMixTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus what HiMix layers need: the vision width d_v and the arch."""

    vision_hidden_size: int = 0
    arch: str = "himix"
    # The embedding's padded row count, fixed when the model is first built (checkpoints record it);
    # None pads Megatron-LM's way for the current TP.
    padded_vocab_size: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if self.padded_vocab_size is not None and self.padded_vocab_size % self.tensor_model_parallel_size:
            raise ConfigError(f"padded_vocab_size {self.padded_vocab_size} (recorded in the checkpoint) is not "
                              f"divisible by tensor_model_parallel_size {self.tensor_model_parallel_size}")


def build_transformer_config(
    lm: LanguageModelConfig,
    vision: VisionModelConfig,
    parallel: ParallelConfig = ParallelConfig(),
    *,
    arch: str = "himix",
    params_dtype: torch.dtype = torch.float32,
    **overrides,
) -> HiMixTransformerConfig:
    """The megatron-core config for `lm` with HiMix layers reading `vision` features.

    `overrides` are TransformerConfig fields (dropout, recompute, bf16, ...); unknown names are refused.
    """
    validate(lm, parallel, arch)
    known = {f.name for f in dataclasses.fields(HiMixTransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown TransformerConfig field(s): {unknown}")
    cuda = torch.cuda.is_available()
    fields = dict(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        kv_channels=lm.kv_channels,
        ffn_hidden_size=lm.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=lm.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        # Fused kernels exist only on GPU.
        bias_activation_fusion=cuda,
        masked_softmax_fusion=cuda,
        bias_dropout_fusion=cuda,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=cuda,
        vision_hidden_size=vision.hidden_size,
        arch=arch,
    )
    fields.update(overrides)
    return HiMixTransformerConfig(**fields)
