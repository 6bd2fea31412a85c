"""Configs and tensor layouts, megatron-core <-> Hugging Face, with no file or process handling.

Language decoder (Llama / Qwen2; HF names relative to `LlamaForCausalLM`):

    megatron (TP=1, global layer i)                   Hugging Face
    embedding.word_embeddings.weight [V_pad, d]       model.embed_tokens.weight [V, d]   (rows >= V: padding)
    output_layer.weight [V_pad, d]                    lm_head.weight, or the embedding when tied
    decoder.final_layernorm.weight                    model.norm.weight
    decoder.layers.i.input_layernorm.weight           model.layers.i.input_layernorm.weight
    decoder.layers.i.self_attention.linear_qkv.*      q_proj, k_proj, v_proj (+ .bias for Qwen2), fused per
                                                      query group g: [q heads of g; k_g; v_g]
    decoder.layers.i.self_attention.linear_proj       o_proj
    decoder.layers.i.pre_mlp_layernorm.weight         post_attention_layernorm.weight
    decoder.layers.i.mlp.linear_fc1.weight            [gate_proj; up_proj]
    decoder.layers.i.mlp.linear_fc2.weight            down_proj
    decoder.layers.i.self_attention.vision_norm       self_attn.vision_norm          (HiMix, RMSNorm_v)
    decoder.layers.i.self_attention.linear_kv_vision  self_attn.vision_k_proj / vision_v_proj, fused per
                                                      query group: [k_g; v_g]       (HiMix)

The Transformer Engine spec fuses the pre-attention / pre-MLP norms into the following linear
(`linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`, `linear_kv_vision.layer_norm_weight`);
those names map to the same HF tensors.

Tensor parallelism: a column-parallel weight is split along its rows. The fused QKV and the vision K/V
are grouped per query group, so a plain split gives each rank whole groups. fc1 is [gate; up] and each
rank needs [gate_r; up_r], so gate and up are split separately. The vocabulary is padded to
`padded_vocab_size` (a multiple of 128 * TP) with zero rows, which are never looked up and give logit 0.

RoPE: megatron's default (non-interleaved, rotate-half) is the HF Llama convention, so Q/K rows need no
permutation.

Vision tower (SiglipVisionModel / CLIPVisionModel-relative names): the layers as model/vision.py loads them,
plus conv1 -> embeddings.patch_embedding (bias-free for CLIP), position_embeddings -> embeddings.position_embedding
(CLIP: the class token's position first) and, CLIP only, class_token [1, 1, d] -> embeddings.class_embedding [d]
and ln_pre -> pre_layrnorm (`hf_vision_tensors`, `vision_hf_shapes`).
"""

from __future__ import annotations

import re
import zlib
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from himix_megatron.config import LanguageModelConfig, VisionModelConfig


class ConversionError(ValueError):
    """A model, tensor or directory that cannot be converted; the message names the tensor, field or file."""


LM_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# megatron-core implements Llama-3 RoPE scaling with these constants fixed (RotaryEmbedding._apply_scaling).
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


# --- configs -------------------------------------------------------------------------------------


def _rope(cfg: dict) -> tuple[float, str, dict]:
    """(theta, type, parameters) from either transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", params.pop("rope_theta", 10000.0))
    params.pop("rope_theta", None)
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), kind, params


def language_from_hf(cfg: dict, name: str, where: str = "config.json") -> LanguageModelConfig:
    """Our LanguageModelConfig from an HF Llama/Qwen2 config.json; anything we would compute differently is refused."""
    model_type = cfg.get("model_type")
    if model_type not in LM_ARCHITECTURES:
        raise ConversionError(
            f"{where}: unsupported language model architecture model_type={model_type!r} "
            f"(architectures={cfg.get('architectures')}); supported: {sorted(LM_ARCHITECTURES.values())}")

    def refuse(field, value, why):
        raise ConversionError(f"{where}: {field}={value!r} is not supported: {why}")

    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", cfg["hidden_act"], "the decoder is SwiGLU (silu)")
    if cfg.get("mlp_bias"):
        refuse("mlp_bias", True, "megatron's Llama layers have no MLP bias")
    if model_type == "llama" and cfg.get("attention_bias"):
        refuse("attention_bias", True, "Llama's attention_bias also adds an o_proj bias, which the megatron spec lacks")
    if model_type == "qwen2" and (cfg.get("use_sliding_window") or
                                  any(t != "full_attention" for t in cfg.get("layer_types") or [])):
        refuse("use_sliding_window", True, "only full attention is implemented")
    theta, kind, params = _rope(cfg)
    factor = None
    if kind == "llama3":
        for key, value in LLAMA3_ROPE_FIXED.items():
            if float(params.get(key, value)) != value:
                refuse(f"rope_scaling.{key}", params[key], f"megatron-core fixes it to {value}")
        factor = float(params["factor"])
    elif kind != "default":
        refuse("rope_scaling.rope_type", kind, "megatron-core implements only Llama-3 scaling")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    return LanguageModelConfig(
        name=name, hidden_size=hidden, num_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads, ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"], max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rotary_base=theta, norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2",
        rope_scaling_factor=factor, head_dim=None if head_dim == hidden // heads else head_dim,
    )


def language_to_hf(lm: LanguageModelConfig) -> dict:
    """HF Llama/Qwen2 config fields for `lm` (transformers 4 names; transformers 5 accepts them too)."""
    model_type = "qwen2" if lm.qkv_bias else "llama"
    rope_scaling = None
    if lm.rope_scaling_factor is not None:
        rope_scaling = {"rope_type": "llama3", "factor": lm.rope_scaling_factor, **LLAMA3_ROPE_FIXED}
    fields = dict(
        model_type=model_type, vocab_size=lm.vocab_size, hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size, num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_query_groups,
        head_dim=lm.kv_channels, hidden_act="silu", rms_norm_eps=lm.norm_epsilon, rope_theta=lm.rotary_base,
        rope_scaling=rope_scaling, max_position_embeddings=lm.max_position_embeddings,
        tie_word_embeddings=lm.tie_embeddings, attention_bias=lm.qkv_bias,
    )
    if model_type == "llama":
        fields["mlp_bias"] = False
    return fields


# transformers' vision model_type -> (our VisionModelConfig.kind, the composite model_type whose
# `vision_config` holds the tower: SiglipModel / CLIPModel).
VISION_TOWERS = {"siglip_vision_model": ("siglip", "siglip"), "clip_vision_model": ("clip", "clip")}
_COMPOSITE = {composite: tower for tower, (_, composite) in VISION_TOWERS.items()}
TOWER_NAMES = {"siglip": "SigLIP", "clip": "CLIP"}  # VisionModelConfig.kind -> the name messages use


def vision_from_hf(cfg: dict, name: str, where: str = "config.json") -> VisionModelConfig:
    """Our VisionModelConfig from a SiglipVisionModel / CLIPVisionModel config, or the vision tower of a
    SiglipModel / CLIPModel config; anything the encoder would compute differently is refused."""
    import transformers

    from himix_megatron.config import VISION_ACTIVATIONS

    model_type = cfg.get("model_type")
    if model_type in _COMPOSITE:
        model_type, cfg = _COMPOSITE[model_type], cfg.get("vision_config") or {}
    if model_type not in VISION_TOWERS:
        raise ConversionError(f"{where}: unsupported vision tower model_type={model_type!r}; supported: "
                              "SiglipVisionModel or CLIPVisionModel, or the vision tower of a SiglipModel or CLIPModel")
    kind = VISION_TOWERS[model_type][0]
    config_class = transformers.CLIPVisionConfig if kind == "clip" else transformers.SiglipVisionConfig
    c = config_class(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")})

    def refuse(field, value, why):
        raise ConversionError(f"{where}: vision {field}={value!r} is not supported: {why}")

    if kind == "siglip" and c.hidden_act != "gelu_pytorch_tanh":
        refuse("hidden_act", c.hidden_act, "SigLIP's gelu_pytorch_tanh is what the encoder computes")
    if c.hidden_act not in VISION_ACTIVATIONS:  # the encoder's activations (model/vision.py ACTIVATIONS)
        refuse("hidden_act", c.hidden_act, f"the encoder computes one of {list(VISION_ACTIVATIONS)}")
    if c.num_channels != 3:
        refuse("num_channels", c.num_channels, "RGB only")
    if kind == "clip" and c.image_size % c.patch_size:
        refuse("image_size", c.image_size, f"not a multiple of patch_size={c.patch_size}: CLIP's position "
               "embeddings cover whole patches")
    return VisionModelConfig(name=name, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                             num_attention_heads=c.num_attention_heads, ffn_hidden_size=c.intermediate_size,
                             image_size=c.image_size, patch_size=c.patch_size, norm_epsilon=c.layer_norm_eps,
                             kind=kind, hidden_act=c.hidden_act)


def vision_to_hf(v: VisionModelConfig) -> dict:
    """The SiglipVisionConfig / CLIPVisionConfig fields of `v` (the inverse of `vision_from_hf`)."""
    model_type = next(t for t, (kind, _) in VISION_TOWERS.items() if kind == v.kind)
    return dict(model_type=model_type, hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads, num_channels=3,
                image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                layer_norm_eps=v.norm_epsilon, attention_dropout=0.0)


# --- fused tensors -------------------------------------------------------------------------------


def _per_group(lm: LanguageModelConfig) -> tuple[int, int, int]:
    return lm.num_query_groups, lm.num_attention_heads // lm.num_query_groups, lm.kv_channels


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, lm: LanguageModelConfig) -> Tensor:
    """[q; k; v] (weights or biases) -> megatron's per-group [q heads of g; k_g; v_g]."""
    groups, per, hd = _per_group(lm)
    rest = q.shape[1:]
    return torch.cat([q.reshape(groups, per * hd, *rest), k.reshape(groups, hd, *rest),
                      v.reshape(groups, hd, *rest)], dim=1).reshape(-1, *rest)


def split_qkv(fused: Tensor, lm: LanguageModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    return _split_qkv(fused, *_per_group(lm))


def _split_qkv(fused: Tensor, groups: int, per: int, hd: int) -> tuple[Tensor, Tensor, Tensor]:
    rest = fused.shape[1:]
    g = fused.reshape(groups, (per + 2) * hd, *rest)
    return (g[:, : per * hd].reshape(-1, *rest), g[:, per * hd:(per + 1) * hd].reshape(-1, *rest),
            g[:, (per + 1) * hd:].reshape(-1, *rest))


def fuse_kv(k: Tensor, v: Tensor, lm: LanguageModelConfig) -> Tensor:
    """HiMix vision K/V -> megatron's per-group [k_g; v_g]."""
    groups, _, hd = _per_group(lm)
    rest = k.shape[1:]
    return torch.cat([k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)], dim=1).reshape(-1, *rest)


def split_kv(fused: Tensor, lm: LanguageModelConfig) -> tuple[Tensor, Tensor]:
    groups, _, hd = _per_group(lm)
    rest = fused.shape[1:]
    g = fused.reshape(groups, 2 * hd, *rest)
    return g[:, :hd].reshape(-1, *rest), g[:, hd:].reshape(-1, *rest)


def pad_vocab(t: Tensor, padded: int) -> Tensor:
    return t if t.shape[0] == padded else torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])


# --- megatron <- HF (import) ---------------------------------------------------------------------


def lm_hf_shapes(lm: LanguageModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the decoder import reads, with its shape."""
    d, hd = lm.hidden_size, lm.kv_channels
    q, kv = lm.num_attention_heads * hd, lm.kv_dim
    shapes = {"model.embed_tokens.weight": (lm.vocab_size, d), "model.norm.weight": (d,)}
    if not lm.tie_embeddings:
        shapes["lm_head.weight"] = (lm.vocab_size, d)
    for i in range(lm.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (lm.ffn_hidden_size, d),
                       p + "mlp.up_proj.weight": (lm.ffn_hidden_size, d),
                       p + "mlp.down_proj.weight": (d, lm.ffn_hidden_size)})
        if lm.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


_NEW = ("self_attention.vision_norm.", "self_attention.linear_kv_vision.", "self_attention.vision_connector.")


def megatron_lm_tensor(name: str, lm: LanguageModelConfig, get: Callable[[str], Tensor],
                       padded_vocab: int) -> Optional[Tensor]:
    """The full (TP=1) value of megatron decoder parameter `name` (global layer numbers) from HF tensors,
    or None when HF has no such parameter (HiMix's vision branch, connectors: new parameters)."""
    if name == "embedding.word_embeddings.weight":
        return pad_vocab(get("model.embed_tokens.weight"), padded_vocab)
    if name == "output_layer.weight":
        return pad_vocab(get("model.embed_tokens.weight" if lm.tie_embeddings else "lm_head.weight"), padded_vocab)
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    if name.startswith("vision_projection."):
        return None
    match = _LAYER.fullmatch(name)
    if not match:
        raise ConversionError(f"no Hugging Face source for megatron parameter {name!r}")
    p, rest = f"model.layers.{match.group(1)}.", match.group(2)
    if rest.startswith(_NEW):
        return None
    if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return get(p + "input_layernorm.weight")
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return get(p + "post_attention_layernorm.weight")
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return fuse_qkv(*(get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"), lm)
    if rest == "self_attention.linear_proj.weight":
        return get(p + "self_attn.o_proj.weight")
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
    if rest == "mlp.linear_fc2.weight":
        return get(p + "mlp.down_proj.weight")
    raise ConversionError(f"no Hugging Face source for megatron parameter {name!r}")


def init_new_parameter(name: str, shape: tuple[int, ...], std: float, seed: int) -> Tensor:
    """Initial value of a parameter HF does not have (DESIGN section 1): norms ones, biases zeros,
    weights normal(0, std). Seeded by the parameter's global name, so every TP/PP layout gets the same
    values (megatron's own init draws from one stream per stage, which depends on the layout)."""
    if name.endswith(("norm.weight", "layer_norm_weight")):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=g)


def full_shape(param: Tensor, tp_size: int) -> tuple[int, ...]:
    """A parameter's shape before megatron split it over `tp_size` tensor-parallel ranks."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def _is_gated_fc1(name: str) -> bool:
    # The decoder MLP's fc1 is SwiGLU's [gate; up]. The connectors' fc1 (GELU, not gated; named
    # `vision_projection.encoder.linear_fc1` / `vision_connector.linear_fc1`) is a plain column split.
    return name.endswith("mlp.linear_fc1.weight")


def shard(name: str, full: Tensor, param: Tensor, rank: int, size: int) -> Tensor:
    """The slice of full (TP=1) value `full` that tensor-parallel rank `rank` of `size` holds."""
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    if _is_gated_fc1(name):
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)])
    return full.chunk(size, dim=param.partition_dim)[rank]


# --- megatron -> HF (export) ---------------------------------------------------------------------


def hf_lm_tensors(state: Mapping[str, Tensor], lm: LanguageModelConfig) -> tuple[dict[str, Tensor], list[str]]:
    """HF tensors (LlamaForCausalLM names + HiMix's) from a TP=1/PP=1 megatron decoder state;
    returns them and the megatron names this function does not map (connectors, for the caller)."""
    out, rest_names = {}, []
    for name, t in state.items():
        if name.endswith("._extra_state"):
            continue
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t[: lm.vocab_size]
        elif name == "output_layer.weight":
            if not lm.tie_embeddings:
                out["lm_head.weight"] = t[: lm.vocab_size]
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif (match := _LAYER.fullmatch(name)) is not None:
            p, rest = f"model.layers.{match.group(1)}.", match.group(2)
            kind = rest.rsplit(".", 1)[1]
            if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
                out[p + "input_layernorm.weight"] = t
            elif rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
                out[p + "post_attention_layernorm.weight"] = t
            elif rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                for x, part in zip("qkv", split_qkv(t, lm)):
                    out[f"{p}self_attn.{x}_proj.{kind}"] = part
            elif rest == "self_attention.linear_proj.weight":
                out[p + "self_attn.o_proj.weight"] = t
            elif rest == "mlp.linear_fc1.weight":
                out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = t.chunk(2)
            elif rest == "mlp.linear_fc2.weight":
                out[p + "mlp.down_proj.weight"] = t
            elif rest in ("self_attention.vision_norm.weight", "self_attention.linear_kv_vision.layer_norm_weight"):
                out[p + "self_attn.vision_norm.weight"] = t
            elif rest in ("self_attention.linear_kv_vision.weight", "self_attention.linear_kv_vision.bias"):
                k, v = split_kv(t, lm)
                out[f"{p}self_attn.vision_k_proj.{kind}"], out[f"{p}self_attn.vision_v_proj.{kind}"] = k, v
            else:
                rest_names.append(name)
        else:
            rest_names.append(name)
    return out, rest_names


# Our encoder's parameters outside its layers -> SiglipVisionModel / CLIPVisionModel-relative names (the layers
# share model/vision.py's `_LAYER_NAMES`). CLIP has the class token and the pre-LayerNorm (`pre_layrnorm`, sic,
# transformers' name) and a bias-free patch conv; SigLIP has neither of the first two.
_EMBEDDING_NAMES = {"conv1.weight": "embeddings.patch_embedding.weight",
                    "conv1.bias": "embeddings.patch_embedding.bias",
                    "position_embeddings.weight": "embeddings.position_embedding.weight",
                    "class_token": "embeddings.class_embedding",
                    "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias"}


def hf_vision_tensors(state: Mapping[str, Tensor], v: VisionModelConfig) -> dict[str, Tensor]:
    """SiglipVisionModel / CLIPVisionModel-relative names ("embeddings.*", "encoder.layers.*") from our encoder's
    TP=1 state. The inverse of model/vision.py's `load_hf_vision_state_dict`, whose name table it shares."""
    from himix_megatron.model.vision import _FROM_TE, _LAYER_NAMES

    heads = v.num_attention_heads
    out = {}
    for name, t in state.items():
        if name.endswith("._extra_state"):
            continue
        if name in _EMBEDDING_NAMES:
            # CLIP's class token is [1, 1, d] in megatron, [d] in HF
            out[_EMBEDDING_NAMES[name]] = t.reshape(-1) if name == "class_token" else t
            continue
        match = _LAYER.fullmatch(name)
        if not match:
            raise ConversionError(f"no Hugging Face name for vision encoder parameter {name!r}")
        p = f"encoder.layers.{match.group(1)}."
        local = _FROM_TE.get(match.group(2), match.group(2))
        module, kind = local.rsplit(".", 1)
        if module == "self_attention.linear_qkv":
            # plain multi-head attention: one query group per head
            for x, part in zip("qkv", _split_qkv(t, heads, 1, v.hidden_size // heads)):
                out[f"{p}self_attn.{x}_proj.{kind}"] = part
        elif module in _LAYER_NAMES:
            out[f"{p}{_LAYER_NAMES[module]}.{kind}"] = t
        else:
            raise ConversionError(f"no Hugging Face name for vision encoder parameter {name!r}")
    return out


def vision_hf_shapes(v: VisionModelConfig, all_layers: bool = False) -> dict[str, tuple[int, ...]]:
    """SiglipVisionModel / CLIPVisionModel-relative names and shapes of what the encoder reads: the embeddings
    (CLIP: the class token and pre-LayerNorm too) and layers 0..L-2 (the penultimate layer's output is the
    feature). With `all_layers`, the complete tower: every layer and the post-LayerNorm (SigLIP's optional
    pooling head aside)."""
    d, f, p = v.hidden_size, v.ffn_hidden_size, v.patch_size
    shapes = {"embeddings.patch_embedding.weight": (d, 3, p, p),
              "embeddings.position_embedding.weight": (v.seq_length, d)}  # CLIP: the class token's position first
    if v.kind == "clip":
        shapes.update({"embeddings.class_embedding": (d,), "pre_layrnorm.weight": (d,), "pre_layrnorm.bias": (d,)})
    else:
        shapes["embeddings.patch_embedding.bias"] = (d,)
    for i in range(v.num_layers if all_layers else v.num_layers - 1):
        q = f"encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{q}{norm}.weight": (d,), f"{q}{norm}.bias": (d,)})
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{q}self_attn.{proj}.weight": (d, d), f"{q}self_attn.{proj}.bias": (d,)})
        shapes.update({q + "mlp.fc1.weight": (f, d), q + "mlp.fc1.bias": (f,),
                       q + "mlp.fc2.weight": (d, f), q + "mlp.fc2.bias": (d,)})
    if all_layers:
        shapes.update({"post_layernorm.weight": (d,), "post_layernorm.bias": (d,)})
    return shapes
