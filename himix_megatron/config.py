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


VISION_KINDS: tuple[str, ...] = ("siglip", "clip")
VISION_ACTIVATIONS: tuple[str, ...] = ("gelu_pytorch_tanh", "gelu", "quick_gelu")  # transformers' hidden_act names


@dataclass(frozen=True)
class VisionModelConfig:
    """A SigLIP- or CLIP-style ViT. HiMix consumes its penultimate-layer patch features.

    kind "siglip": no class token, patch conv with bias, no pre-LayerNorm; the first patch is dropped.
    kind "clip": a class token, bias-free patch conv, pre-LayerNorm; the class token is dropped (LLaVA's
    hidden_states[-2][:, 1:]). `kind` and `hidden_act` default to SigLIP so older configs keep loading.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    image_size: int
    patch_size: int
    norm_epsilon: float
    kind: str = "siglip"
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if self.kind not in VISION_KINDS:
            raise ConfigError(f"{self.name}: vision kind={self.kind!r} is not one of {list(VISION_KINDS)}")
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ConfigError(f"{self.name}: vision hidden_act={self.hidden_act!r} is not one of "
                              f"{list(VISION_ACTIVATIONS)}")

    @property
    def class_token(self) -> bool:
        return self.kind == "clip"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_length(self) -> int:
        """Tokens inside the encoder: the patches, plus CLIP's class token."""
        return self.num_patches + (1 if self.class_token else 0)

    @property
    def num_features(self) -> int:
        """Vision tokens fed to the decoder: every patch but the first (27*27-1 = 728 for SigLIP-384);
        for CLIP every patch (the class token is dropped instead): 14*14 = 196 for ViT-?/16 at 224."""
        return self.num_patches if self.class_token else self.num_patches - 1


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    # The frozen vision encoder's own TP size E within each TP group (parallel/encoder.py): T / E copies,
    # each encoding its share of the images. None: 1, replicated, measured the faster when the images split
    # evenly (docs/parallelism.md, "Tensor parallelism: where the encoder runs"; the trainer picks per its
    # micro-batches).
    encoder_tensor_model_parallel_size: Optional[int] = None

    @property
    def encoder_tp(self) -> int:
        e = self.encoder_tensor_model_parallel_size
        return 1 if e is None else e


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
        # Tiny CLIP towers for tests (quick_gelu, like OpenAI CLIP).
        VisionModelConfig("tiny-clip", 48, 3, 4, 96, image_size=56, patch_size=14, norm_epsilon=1e-5, kind="clip",
                          hidden_act="quick_gelu"),
        # TinyCLIP vision towers (paper Table 6), from microsoft/Cream TinyCLIP/src/open_clip/model_configs/*.json:
        # width, layers, patch, image as there; heads = width / 64 and FFN = 4 x width are open_clip's defaults
        # (head_width=64, mlp_ratio=4), GELU (erf: no quick_gelu in these configs) and LayerNorm eps 1e-5 too.
        VisionModelConfig("tinyclip-39m", 512, 12, 8, 2048, image_size=224, patch_size=16, norm_epsilon=1e-5,
                          kind="clip", hidden_act="gelu"),
        VisionModelConfig("tinyclip-40m", 512, 12, 8, 2048, image_size=224, patch_size=32, norm_epsilon=1e-5,
                          kind="clip", hidden_act="gelu"),
        VisionModelConfig("tinyclip-61m", 640, 12, 10, 2560, image_size=224, patch_size=32, norm_epsilon=1e-5,
                          kind="clip", hidden_act="gelu"),
        # openai/clip-vit-large-patch14-336, LLaVA-1.5's tower: 576 x 1024 features.
        VisionModelConfig("clip-vit-l-14-336", 1024, 24, 16, 4096, image_size=336, patch_size=14, norm_epsilon=1e-5,
                          kind="clip", hidden_act="quick_gelu"),
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
    e = parallel.encoder_tp
    if e < 1 or tp % e:
        raise ConfigError(f"encoder_tensor_model_parallel_size={e} must be >= 1 and divide "
                          f"tensor_model_parallel_size={tp}")
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
    # gamma-MoD on the vanilla model (model/gamma_mod.py). Layer indices are 0-based.
    gamma_mod: bool = False
    mod_layers: Optional[tuple[int, ...]] = None  # None: every layer but the first three and the last
    mod_capacity: float = 0.5  # training: the fraction of a sample's routable tokens a MoD layer processes
    mod_aux_loss_coeff: float = 0.01  # x the sum over MoD layers of the router's cross entropy
    mod_threshold: float = 0.005  # inference (eval mode): a token is processed iff its router probability > this
    mod_decode_threshold: float = 0.5  # inference, one new token over a KV cache: processed iff p >= this (HF side)
    mod_router_bias: bool = False  # the official router is Linear(d, 2, bias=False)
    # What a skipped token skips: "layer" (the official code: attention and MLP run for the routed tokens only)
    # or "mlp" (attention for every token, the MLP for the routed ones).
    mod_skip: str = "layer"
    # Token ids of the conversation template's system header ("<s>{system} USER:"): a sample whose text starts
    # with them has those tokens routable (besides its image). Set by the trainer from its tokenizer; not a
    # property of the weights, so checkpoints do not record it.
    mod_system_prefix: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        super().__post_init__()
        if self.padded_vocab_size is not None and self.padded_vocab_size % self.tensor_model_parallel_size:
            raise ConfigError(f"padded_vocab_size {self.padded_vocab_size} (recorded in the checkpoint) is not "
                              f"divisible by tensor_model_parallel_size {self.tensor_model_parallel_size}")
        if self.gamma_mod:
            check_gamma_mod(self)

    @property
    def mod_layer_indices(self) -> tuple[int, ...]:
        """The 0-based MoD layers of a gamma-MoD model (empty otherwise)."""
        if not self.gamma_mod:
            return ()
        return tuple(sorted(self.mod_layers)) if self.mod_layers is not None else default_mod_layers(self.num_layers)


MOD_SKIPS = ("layer", "mlp")


def default_mod_layers(num_layers: int) -> tuple[int, ...]:
    """gamma-MoD's default ("arank_mod" in its code): every layer but 0, 1, 2 and the last."""
    return tuple(i for i in range(num_layers) if i not in {0, 1, 2, num_layers - 1})


def check_gamma_mod(config: "HiMixTransformerConfig") -> None:
    """Refuse a gamma-MoD setting that cannot be built; messages name the field."""
    if config.arch != "vanilla":
        raise ConfigError(f"gamma_mod needs arch='vanilla' (got arch={config.arch!r}): MoD routes the image tokens "
                          "of the vanilla sequence")
    layers = config.mod_layer_indices
    if config.mod_layers is not None:
        bad = [i for i in config.mod_layers if not 0 <= i < config.num_layers]
        if bad or len(set(config.mod_layers)) != len(config.mod_layers):
            raise ConfigError(f"mod_layers={list(config.mod_layers)}: each must be a distinct layer index in "
                              f"[0, {config.num_layers})")
    if not layers:
        raise ConfigError(f"mod_layers: a {config.num_layers}-layer model has no MoD layer by default (every layer "
                          "but the first three and the last); name them explicitly")
    if not 0.0 < config.mod_capacity <= 1.0:
        raise ConfigError(f"mod_capacity={config.mod_capacity} must be in (0, 1]")
    if config.mod_aux_loss_coeff < 0:
        raise ConfigError(f"mod_aux_loss_coeff={config.mod_aux_loss_coeff} must be >= 0")
    if config.mod_skip not in MOD_SKIPS:
        raise ConfigError(f"mod_skip={config.mod_skip!r}: choose one of {list(MOD_SKIPS)}")
    for name in ("mod_threshold", "mod_decode_threshold"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ConfigError(f"{name}={getattr(config, name)} must be in [0, 1)")
    if config.sequence_parallel:
        raise ConfigError("gamma_mod does not support sequence_parallel: routing picks tokens across the whole "
                          "sequence")


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
