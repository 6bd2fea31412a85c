"""HiMix for Hugging Face transformers (remote code): a Llama / Qwen2 decoder whose text queries also attend
to per-layer vision keys/values computed from raw SigLIP (or CLIP) features.

This file is copied verbatim next to exported weights, so it imports only torch and transformers.

Per decoder layer i, with X_v [b, N, d_v] the raw vision features (the same for every layer) and h the text:

    x = RMSNorm_v^i(X_v);  K_v = x W_K,v^i;  V_v = x W_V,v^i          (no RoPE on vision keys)
    Q, K, V from h, RoPE on Q and K at text positions (vision tokens are not counted)
    out = softmax(Q [K_v; K]^T / sqrt(head_dim)) [V_v; V]               causal, aligned bottom-right

so text query j sees all N vision keys and text keys 0..j. Only text flows through the residual stream and the
MLPs. Without an image N = 0 and the layer is exactly the base LM's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, DynamicCache, GenerationMixin, PreTrainedModel, SiglipVisionModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_himix import HiMixConfig

# Each layer's vision K/V live in a dict {layer_idx: (K_v, V_v)} attached to the transformers Cache object,
# next to its text K/V, rather than being prepended to the cached keys. They are computed once at prefill and
# read back on every decode step. Kept apart, the Cache's own length stays the number of *text* tokens, which
# is what generate() assumes everywhere: it equals the attention_mask length, drives the slicing of input_ids
# on cache continuation and the position ids. Prepending them would make every one of those off by N.
# Beam search reorders only the text cache, which is harmless: beams of one sample share the same image.
_VISION_KV_ATTR = "himix_vision_kv"

# transformers 5.24 renamed the cache everywhere from `past_key_values` to `cache`: generate() passes it to
# forward() under the new name and reads it back from the output's `cache` field. Earlier 5.x releases use the
# old name for both. forward() takes either keyword, and the output carries the cache under the field that the
# installed release declares, so the same file serves both sides of the rename.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _vision_kv_store(cache) -> dict | None:
    if cache is None:
        return None
    if not hasattr(cache, _VISION_KV_ATTR):
        setattr(cache, _VISION_KV_ATTR, {})
    return getattr(cache, _VISION_KV_ATTR)


def rope_inv_freq(config: HiMixConfig, device=None) -> torch.Tensor:
    """Inverse frequencies of the default, linear or Llama-3 RoPE, computed as transformers' Llama does."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device, torch.float) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class HiMixRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class HiMixMLP(nn.Module):
    def __init__(self, config: HiMixConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HiMixAttention(nn.Module):
    """Text self-attention with this layer's vision K/V prepended to the keys/values (one softmax)."""

    def __init__(self, config: HiMixConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim, self.n_heads, self.n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        bias, kv_dim = config.attention_bias, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.vision_norm = HiMixRMSNorm(config.vision_hidden_size, config.rms_norm_eps)
        self.vision_k_proj = nn.Linear(config.vision_hidden_size, kv_dim, bias=bias)
        self.vision_v_proj = nn.Linear(config.vision_hidden_size, kv_dim, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)

    def vision_key_value(self, vision_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.vision_norm(vision_features)
        return self._heads(self.vision_k_proj(x)), self._heads(self.vision_v_proj(x))

    def forward(self, hidden_states, cos, sin, mask, vision_features, cache, vision_store):
        query = self._heads(self.q_proj(hidden_states))
        key = self._heads(self.k_proj(hidden_states))
        value = self._heads(self.v_proj(hidden_states))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        vision_kv = None
        if vision_features is not None:
            vision_kv = self.vision_key_value(vision_features)
            if vision_store is not None:
                vision_store[self.layer_idx] = vision_kv
        elif vision_store:
            vision_kv = vision_store[self.layer_idx]
        if vision_kv is not None:
            key = torch.cat([vision_kv[0].to(key.dtype), key], dim=2)
            value = torch.cat([vision_kv[1].to(value.dtype), value], dim=2)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:2], -1))


class HiMixDecoderLayer(nn.Module):
    def __init__(self, config: HiMixConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = HiMixRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = HiMixAttention(config, layer_idx)
        self.post_attention_layernorm = HiMixRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = HiMixMLP(config)

    def forward(self, hidden_states, *attn_args):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), *attn_args)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class HiMixTextModel(nn.Module):
    """The decoder: embeddings, layers and final norm (parameter names `model.*`, as in Llama / Qwen2)."""

    def __init__(self, config: HiMixConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(HiMixDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = HiMixRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, position_ids=None, vision_features=None, cache=None):
        batch, length = input_ids.shape
        device = input_ids.device
        past = cache.get_seq_length() if cache is not None else 0
        vision_store = _vision_kv_store(cache)
        if vision_features is not None:
            num_vision = vision_features.shape[1]
            if vision_store is not None:
                vision_store.clear()  # a new image replaces the one cached by an earlier call
        elif vision_store:
            num_vision = next(iter(vision_store.values()))[0].shape[2]
        else:
            num_vision = 0

        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch, past + length):
                raise ValueError(
                    f"attention_mask must be 2-D [batch, cached + new text tokens] = {(batch, past + length)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.bool()
        if position_ids is None:
            if attention_mask is not None:  # left padding: a token's position is its index among real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + length, device=device).expand(batch, -1)

        hidden_states = self.embed_tokens(input_ids)
        freqs = position_ids[..., None].float() * rope_inv_freq(self.config, device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(hidden_states.dtype), emb.sin().to(hidden_states.dtype)
        mask = self._mask(attention_mask, batch, length, past, num_vision, device)
        if vision_features is not None:
            vision_features = vision_features.to(hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin, mask, vision_features, cache, vision_store)
        return self.norm(hidden_states)

    @staticmethod
    def _mask(attention_mask, batch, length, past, num_vision, device):
        """[b, 1, length, N + past + length] boolean (True = attend), or None when nothing is masked.

        Vision keys come first and are visible to every query (the text attention_mask never covers them);
        text keys are causal. Together this is the causal mask aligned bottom-right over N + M keys.
        """
        if attention_mask is None and length == 1:
            return None
        query_pos = torch.arange(past, past + length, device=device)
        key_pos = torch.arange(past + length, device=device)
        text = (key_pos[None, :] <= query_pos[:, None]).expand(batch, -1, -1)
        if attention_mask is not None:
            # A query always sees itself, so that a padded query never has an all-masked row (NaN in SDPA) when
            # N = 0. Padded outputs are discarded and, masked as keys, never reach a real token.
            text = (text & attention_mask[:, None, :]) | (key_pos[None, :] == query_pos[:, None])
        vision = torch.ones(batch, length, num_vision, dtype=torch.bool, device=device)
        return torch.cat([vision, text], dim=-1)[:, None]


# vision_config.model_type -> the tower (configuration_himix's VISION_CONFIGS).
VISION_MODELS = {"siglip_vision_model": SiglipVisionModel, "clip_vision_model": CLIPVisionModel}


class HiMixVisionTower(nn.Module):
    """The frozen SigLIP or CLIP encoder (as vision_config's model_type says), returning HiMix's raw vision
    features X_v.

    transformers 5 flattened SiglipVisionModel's and CLIPVisionModel's parameter names (`embeddings.*`,
    `encoder.*`); nesting the tower under `vision_model` keeps the layout of their checkpoints and of transformers 4
    (`vision_model.embeddings.*`), so exported weights read `vision_tower.vision_model.*` whatever the version.
    """

    def __init__(self, config: HiMixConfig):
        super().__init__()
        self.feature_layer = config.vision_feature_layer
        self.vision_model = VISION_MODELS[config.vision_config.model_type](config.vision_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """hidden_states[vision_feature_layer] (penultimate: no post-layernorm), first token dropped: SigLIP's first
        patch, CLIP's class token (LLaVA's selection)."""
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        out = self.vision_model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.feature_layer][:, 1:]


class HiMixPreTrainedModel(PreTrainedModel):
    config_class = HiMixConfig
    config: HiMixConfig
    base_model_prefix = "model"
    _no_split_modules = ["HiMixDecoderLayer", "SiglipEncoderLayer", "CLIPEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Only the vision tower follows config._attn_implementation; the mixture attention always uses SDPA
    # with an explicit mask, because the bottom-right causal alignment needs one.
    _supports_sdpa = True


class HiMixForCausalLM(HiMixPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HiMixConfig):
        super().__init__(config)
        self.vision_tower = HiMixVisionTower(config)
        self.model = HiMixTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixel_values)

    def _strip_image_tokens(self, input_ids, attention_mask=None, labels=None):
        """Remove `<image>` placeholders: HiMix's image enters through the vision K/V, never the sequence."""
        token = self.config.image_token_index
        if token is None or input_ids is None or not (input_ids == token).any():
            return input_ids, attention_mask, labels, False
        keep = input_ids != token
        counts = keep.sum(1)
        if (counts != counts[0]).any():
            raise ValueError("every row of input_ids must hold the same number of image placeholder tokens")
        batch, length = input_ids.shape
        strip = lambda t: t[keep].view(batch, -1)  # noqa: E731
        if attention_mask is not None:  # it may also cover cached tokens, before the new ones
            attention_mask = torch.cat([attention_mask[:, : attention_mask.shape[1] - length],
                                        strip(attention_mask[:, -length:])], dim=1)
        return strip(input_ids), attention_mask, None if labels is None else strip(labels), True

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("HiMixForCausalLM needs input_ids (inputs_embeds are not supported)")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("HiMixForCausalLM does not accept inputs_embeds; pass input_ids")
        if pixel_values is not None and vision_features is not None:
            raise ValueError("pass either pixel_values or vision_features, not both")
        input_ids, attention_mask, labels, stripped = self._strip_image_tokens(input_ids, attention_mask, labels)
        if stripped:
            position_ids = None  # they counted the placeholders

        if pixel_values is not None:
            vision_features = self.get_vision_features(pixel_values)
        if vision_features is not None:
            d_v = self.config.vision_hidden_size
            if vision_features.dim() != 3 or vision_features.shape[-1] != d_v:
                raise ValueError(
                    f"vision_features must be [batch, num_vision_tokens, {d_v}] (vision_hidden_size d_v = {d_v}), "
                    f"got {tuple(vision_features.shape)}"
                )
            if vision_features.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"vision_features batch ({vision_features.shape[0]}) != input_ids batch ({input_ids.shape[0]})"
                )

        if past_key_values is not None and cache is not None:
            raise ValueError("pass the cache as either past_key_values or cache, not both")
        past_key_values = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            past_key_values = None
        elif past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        hidden_states = self.model(input_ids, attention_mask, position_ids, vision_features, past_key_values)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: past_key_values})
        return output.to_tuple() if return_dict is False else output

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        # After prefill, the cache holds every layer's vision K/V: the image must not be encoded again.
        # transformers already drops pixel_values; vision_features is ours to drop.
        if not is_first_iteration and inputs.get("use_cache", True):
            inputs.pop("pixel_values", None)
            inputs.pop("vision_features", None)
        return inputs

    def generate(self, inputs=None, **kwargs):
        # Placeholders are stripped here, not only in forward: generate keeps its own copy of input_ids and
        # attention_mask, and both must match the text the cache actually holds.
        input_ids = kwargs.pop("input_ids", inputs)
        input_ids, attention_mask, _, stripped = self._strip_image_tokens(input_ids, kwargs.pop("attention_mask", None))
        if stripped:
            kwargs.pop("position_ids", None)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return super().generate(input_ids, **kwargs)


__all__ = ["HiMixForCausalLM", "HiMixPreTrainedModel"]
