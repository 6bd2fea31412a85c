"""FastV and gamma-MoD inference on transformers' LLaVA: `trust_remote_code` file of the vanilla exports.

Imports only torch and transformers: himix_megatron/hf's `write_baselines_code` copies it into an export directory,
whose config.json names `LlavaBaselinesConfig` (model_type "llava_baselines") and
`LlavaBaselinesForConditionalGeneration` in its auto_map. The model is `LlavaForConditionalGeneration` with its
language model's layer loop replaced when a baseline is switched on (with neither, it is exactly transformers'
model). Config fields:

FastV (Chen et al. 2024; official code github.com/pkunlp-icler/FastV), inference only:
  fastv_k (int >= 1, or null: off), fastv_r (float in [0, 1]), fastv_ranking ("last_token" | "all_tokens").
  Before layer K, the image tokens (input_ids == image_token_id) of each sample are ranked by the attention layer
  K-1 gives them, averaged over heads: from the ranking query alone ("last_token", the official choice; the
  query is the last non-padding token of the prompt, or `fastv_query_index`), or averaged over every non-padding
  query up to the ranking query ("all_tokens", causally masked entries counting as 0). The top round(N * (1 - R))
  stay; layers K and later see only them and the text tokens, at their original RoPE positions. With a KV cache
  the pruning happens once, in the forward that fills the cache (the prefill): layers >= K cache only the kept
  tokens, layers < K everything, and each later step attends to those caches. A pruned token's output (and
  logits) is its state entering layer K.

gamma-MoD (Luo et al. 2024; official code github.com/Yaxin9Luo/Gamma-MOD), inference of a trained model:
  mod_layers (list of 0-based layer indices), mod_threshold (default 0.005, the official prefill rule: a routable
  token is skipped iff p <= it), mod_decode_threshold (null, or the official decode rule's 0.5: a token of a later
  step is skipped iff p < it), mod_skip ("mlp" | "layer"), mod_route_prefix (default true), mod_route_text
  (default false), mod_router_bias (default false, as the official router).
  One router Linear(hidden, 2) shared by every MoD layer, `mod_router` at the top of the language model (tensors
  `model.language_model.mod_router.weight` [2, hidden] and `.bias` [2]), reads each MoD layer's input-norm
  output: p = softmax(router(input_layernorm(h)))[..., 1]. Every token that runs a MoD layer's MLP has that output
  multiplied by p (the official code scales every processed token, text included). A skipped token bypasses
  the MLP ("mlp": attention still runs for it and it stays a key) or the whole layer ("layer", the official and
  this repository's megatron MoD: it is neither query nor key there, now or at later steps, and the layer's
  tokens take RoPE positions renumbered 0, 1, ... over the tokens it processes, as the official code does).
  Routable at the prefill (the forward that fills the cache): the image tokens (input_ids == image_token_id),
  with mod_route_prefix the tokens before the first image token too (the system header of LLaVA's templates),
  the positions of the optional `mod_routable_mask` ([batch, prompt] bool, a forward / generate argument), and
  with mod_route_text every token (the official inference routes without a mask). Tokens of later steps
  (generated text) are never skipped unless mod_decode_threshold is set. Decisions of the last forward:
  `model.model.language_model.mod_last_skipped` ({layer: [batch, seq] bool}).

With a baseline on: full causal attention ("sdpa" or "eager"), 2D attention masks, dynamic caches; the per-layer
masks kept with the cache are not reordered by beam search (harmless for FastV and prefill-only MoD, whose masks
are equal across a sample's beams; not with mod_decode_threshold). FastV and gamma-MoD are not combined.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

FASTV_RANKINGS = ("last_token", "all_tokens")
MOD_SKIPS = ("mlp", "layer")
MOD_DEFAULT_THRESHOLD = 0.005  # Gamma-MOD's MoDLlamaDecoderLayer_forward_inference: `route_probabilities > 0.005`
ROUTER = "mod_router"  # the language model's attribute: HF key model.language_model.mod_router.{weight,bias}


class LlavaBaselinesConfig(LlavaConfig):
    """LlavaConfig whose model type says "remote code": fastv_* and mod_* ride along as config attributes."""

    model_type = "llava_baselines"


def _get(config, name, default):
    value = getattr(config, name, None)
    return default if value is None else value


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
    image_token_id: int
    fastv_k: int | None = None
    fastv_r: float = 0.0
    fastv_ranking: str = "last_token"
    mod_layers: tuple = ()
    mod_threshold: float = MOD_DEFAULT_THRESHOLD
    mod_decode_threshold: float | None = None
    mod_skip: str = "mlp"
    mod_route_prefix: bool = True
    mod_route_text: bool = False
    mod_router_bias: bool = False

    @classmethod
    def from_config(cls, config) -> "BaselineSettings":
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_index")
        s = cls(image_token_id=int(image_token_id),
                fastv_k=None if getattr(config, "fastv_k", None) is None else int(config.fastv_k),
                fastv_r=float(_get(config, "fastv_r", 0.0)),
                fastv_ranking=_get(config, "fastv_ranking", "last_token"),
                mod_layers=tuple(int(i) for i in (getattr(config, "mod_layers", None) or ())),
                mod_threshold=float(_get(config, "mod_threshold", MOD_DEFAULT_THRESHOLD)),
                mod_decode_threshold=getattr(config, "mod_decode_threshold", None),
                mod_skip=_get(config, "mod_skip", "mlp"),
                mod_route_prefix=bool(_get(config, "mod_route_prefix", True)),
                mod_route_text=bool(_get(config, "mod_route_text", False)),
                mod_router_bias=bool(_get(config, "mod_router_bias", False)))
        s.check(config.text_config.num_hidden_layers)
        return s

    def check(self, num_layers: int) -> None:
        if self.fastv_k is not None:
            if not 1 <= self.fastv_k <= num_layers:
                raise ValueError(f"fastv_k={self.fastv_k}: must be between 1 and the {num_layers} layers (layer K-1's "
                                 "attention ranks the image tokens)")
            if not 0.0 <= self.fastv_r <= 1.0:
                raise ValueError(f"fastv_r={self.fastv_r}: the pruned fraction must be between 0 and 1")
            if self.fastv_ranking not in FASTV_RANKINGS:
                raise ValueError(f"fastv_ranking={self.fastv_ranking!r}: choose one of {FASTV_RANKINGS}")
        if self.mod_layers:
            layers = self.mod_layers
            if len(set(layers)) != len(layers) or not all(0 <= i < num_layers for i in layers):
                raise ValueError(f"mod_layers={list(self.mod_layers)}: distinct layer indices below {num_layers}")
            for name in ("mod_threshold", "mod_decode_threshold"):
                value = getattr(self, name)
                if value is not None and not 0.0 <= value <= 1.0:
                    raise ValueError(f"{name}={value}: a probability")
            if self.mod_skip not in MOD_SKIPS:
                raise ValueError(f"mod_skip={self.mod_skip!r}: choose one of {MOD_SKIPS}")
            if self.fastv_k is not None:
                raise ValueError("FastV (fastv_k) and gamma-MoD (mod_layers) are not combined: switch one off")

    @property
    def active(self) -> bool:
        return self.fastv_k is not None or bool(self.mod_layers)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x, cos, sin):  # x [b, heads, s, d]; cos, sin [b, s, d]
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _additive_mask(valid, queries: int, dtype):
    """[b, 1, queries, keys] additive mask: key j is visible to query i (the i-th of the last `queries` key slots)
    when `valid[b, j]` and j is not after it. Rows that see nothing stay finite (softmax stays defined)."""
    keys = valid.shape[1]
    j = torch.arange(keys, device=valid.device)
    i = torch.arange(keys - queries, keys, device=valid.device)
    allowed = valid[:, None, :] & (j[None, None, :] <= i[None, :, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


_CACHE_KWARG = {}


def _cache_kwarg(attn) -> str:
    """The attention's cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    cls = type(attn)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


_OUTPUT_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} \
    else "past_key_values"


class _BaselinesTextModel:
    """Mixed into the language model's class (LlamaModel, Qwen2Model): the layer loop with FastV / gamma-MoD."""

    _baselines: BaselineSettings
    _baselines_batch = None  # {"input_ids", "mod_routable_mask", "fastv_query_index"}, set by the LLaVA forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                **kwargs):
        s = self._baselines
        if not s.active:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        batch = self._baselines_batch or {}
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = legacy if cache is None else cache
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.get(name):
                raise ValueError(f"{name} is not available with FastV / gamma-MoD switched on")
        if self.config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"FastV / gamma-MoD run with attn_implementation 'sdpa' or 'eager', not "
                             f"{self.config._attn_implementation!r}")
        if any(t != "full_attention" for t in (getattr(self.config, "layer_types", None) or ())):
            raise ValueError("FastV / gamma-MoD support full causal attention only (no sliding window layers)")
        if input_ids is not None:
            ids = input_ids
            if inputs_embeds is None:
                inputs_embeds = self.embed_tokens(input_ids)
        else:
            ids = batch.get("input_ids")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        b, q = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past = cache.get_seq_length() if cache is not None else 0  # layer 0: always the full sequence
        state = getattr(cache, "_llava_baselines", None) if cache is not None else None
        prefill = past == 0
        if prefill and cache is not None:
            state = cache._llava_baselines = {}
        elif not prefill and state is None:
            raise ValueError("this cache was not filled by the FastV / gamma-MoD model")
        if position_ids is None:
            position_ids = torch.arange(past, past + q, device=device)[None]
        position_ids = position_ids.expand(b, q)
        if attention_mask is None:
            valid = torch.ones(b, past + q, dtype=torch.bool, device=device)
        elif attention_mask.dim() == 2:
            valid = attention_mask.bool()
            if valid.shape[1] == q and past:  # a mask of the new tokens only
                valid = torch.cat([torch.ones(b, past, dtype=torch.bool, device=device), valid], dim=1)
            if valid.shape[1] != past + q:
                raise ValueError(f"attention_mask covers {valid.shape[1]} positions, not the {past + q} of the cache "
                                 "and the input")
        else:
            raise ValueError("FastV / gamma-MoD take a 2D attention mask (batch, keys)")
        image = None
        if prefill:
            if ids is None:
                raise ValueError("FastV / gamma-MoD need input_ids at the prefill (the image-token positions)")
            image = ids == s.image_token_id

        dtype = inputs_embeds.dtype
        hidden = inputs_embeds
        embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        mask = _additive_mask(valid, q, dtype)
        mod = None
        if s.mod_layers:
            mod = self._mod_setup(s, prefill, image, valid, batch, b, q, device)
        self.mod_last_skipped = {}
        kept = full = received = None  # received: layer K-1's attention to the image, ranks them at layer K
        for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if s.fastv_k is not None and i == s.fastv_k:
                if prefill:
                    slots, slot_valid = self._fastv_keep(s, received, image, valid)
                    full, kept = hidden, (slots, slot_valid)
                    hidden = hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1]))
                    positions = position_ids.gather(1, slots)
                    embeddings = self.rotary_emb(hidden, position_ids=positions)
                    pruned_valid = slot_valid
                    self.fastv_last_kept = [slots[r][slot_valid[r] & image[r].gather(0, slots[r])]
                                            for r in range(b)]
                else:
                    pruned_valid = torch.cat([state["fastv_valid"], valid[:, past:]], dim=1)
                if state is not None:
                    state["fastv_valid"] = pruned_valid
                mask = _additive_mask(pruned_valid, hidden.shape[1], dtype)
            if s.fastv_k is not None and i == s.fastv_k - 1 and prefill:
                received = self._fastv_received(s, layer, hidden, embeddings, valid, batch, image)
            if mod is not None and i in mod["layers"]:
                hidden = self._mod_layer(s, i, layer, hidden, mask, embeddings, cache, mod, state, valid, dtype)
            else:
                hidden = self._layer(layer, hidden, mask, embeddings, cache)
        if kept is not None:  # pruned tokens keep the state they entered layer K with
            slots, slot_valid = kept
            out = torch.cat([full, full.new_zeros(b, 1, full.shape[-1])], dim=1)
            target = torch.where(slot_valid, slots, full.shape[1])
            out = out.scatter(1, target[..., None].expand(-1, -1, hidden.shape[-1]), hidden)
            hidden = out[:, :-1]
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{_OUTPUT_CACHE_FIELD: cache})

    # --- one decoder layer (LlamaDecoderLayer / Qwen2DecoderLayer's own computation) --------------------------

    def _attention(self, layer, normed, mask, embeddings, cache):
        attn = layer.self_attn
        out, _ = attn(hidden_states=normed, position_embeddings=embeddings, attention_mask=mask,
                      **{_cache_kwarg(attn): cache})
        return out

    def _layer(self, layer, hidden, mask, embeddings, cache):
        hidden = hidden + self._attention(layer, layer.input_layernorm(hidden), mask, embeddings, cache)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    # --- FastV ------------------------------------------------------------------------------------------------

    def _fastv_received(self, s, layer, hidden, embeddings, valid, batch, image):
        """[b, s]: the head-averaged attention layer `layer` gives each key, from the ranking query or averaged over
        every non-padding query up to it; computed as the layer attends (its q/k projections, RoPE, causal mask)."""
        attn = layer.self_attn
        b, n = hidden.shape[:2]
        d = attn.head_dim
        x = layer.input_layernorm(hidden)
        cos, sin = embeddings
        key = _rope(attn.k_proj(x).view(b, n, -1, d).transpose(1, 2), cos, sin).float()
        last = self._fastv_query(batch, valid, b, n)  # [b]
        if s.fastv_ranking == "last_token":
            rows = last[:, None]  # [b, 1]
            take = lambda t: t.gather(1, rows[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
            query = _rope(attn.q_proj(take(x)).view(b, 1, -1, d).transpose(1, 2), take(cos), take(sin)).float()
        else:
            rows = torch.arange(n, device=hidden.device).expand(b, n)
            query = _rope(attn.q_proj(x).view(b, n, -1, d).transpose(1, 2), cos, sin).float()
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # GQA: each head's key group
        scores = query @ key.transpose(-1, -2) * attn.scaling  # [b, h, rows, s]
        allowed = valid[:, None, None, :] & (torch.arange(n, device=hidden.device) <= rows[..., None])[:, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)  # [b, rows, s]
        if s.fastv_ranking == "last_token":
            return probs[:, 0]
        weights = (valid & (rows <= last[:, None])).float()  # the prompt's queries, up to the ranking query
        return (probs * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)

    @staticmethod
    def _fastv_query(batch, valid, b, n):
        """[b]: the ranking query's index: `fastv_query_index` if given, else each sample's last non-padding one."""
        index = batch.get("fastv_query_index")
        if index is None:
            last = torch.arange(n, device=valid.device).expand(b, n).masked_fill(~valid, -1).amax(1)
            return last.clamp(min=0)
        index = torch.as_tensor(index, device=valid.device).long().reshape(-1).expand(b)
        if not bool(((0 <= index) & (index < n)).all()):
            raise ValueError(f"fastv_query_index {index.tolist()} is outside the {n} positions of the prompt")
        return index

    @staticmethod
    def _fastv_keep(s, received, image, valid):
        """(slots [b, S'], slot_valid [b, S']): per sample, its non-padding text tokens and top image tokens in
        their original order, left-padded to a common length with invalid slots."""
        rows = []
        for r in range(image.shape[0]):
            img = (image[r] & valid[r]).nonzero().flatten()
            top = img[received[r, img].topk(kept_image_tokens(img.numel(), s.fastv_r)).indices]
            text = (valid[r] & ~image[r]).nonzero().flatten()
            rows.append(torch.cat([text, top]).sort().values)
        width = max(1, max(len(x) for x in rows))
        slots = torch.zeros(len(rows), width, dtype=torch.long, device=valid.device)
        slot_valid = torch.zeros(len(rows), width, dtype=torch.bool, device=valid.device)
        for r, x in enumerate(rows):
            if len(x):
                slots[r, width - len(x):] = x
                slot_valid[r, width - len(x):] = True
        return slots, slot_valid

    # --- gamma-MoD ----------------------------------------------------------------------------------------------

    def _mod_setup(self, s, prefill, image, valid, batch, b, q, device):
        """The tokens this forward may skip: {"routable": [b, q] under mod_threshold, "decode": [b, q] under
        mod_decode_threshold}."""
        new_valid = valid[:, -q:]
        routable = torch.zeros(b, q, dtype=torch.bool, device=device)
        decode = torch.zeros(b, q, dtype=torch.bool, device=device)
        if prefill:
            routable |= image
            if s.mod_route_prefix:
                has = image.any(1, keepdim=True)
                first = image.float().argmax(1, keepdim=True)
                routable |= has & (torch.arange(q, device=device) < first)
            if s.mod_route_text:
                routable[:] = True
            extra = batch.get("mod_routable_mask")
            if extra is not None:
                extra = torch.as_tensor(extra, device=device).bool()
                if extra.shape != (b, q):
                    raise ValueError(f"mod_routable_mask has shape {tuple(extra.shape)}, the prompt {(b, q)}")
                routable |= extra
        elif s.mod_decode_threshold is not None:
            decode = new_valid.clone()
        return {"layers": set(s.mod_layers), "routable": routable & new_valid, "decode": decode}

    def _mod_layer(self, s, i, layer, hidden, mask, embeddings, cache, mod, state, valid, dtype):
        normed = layer.input_layernorm(hidden)
        p = getattr(self, ROUTER)(normed).float().softmax(-1)[..., 1]  # [b, q]
        skip = mod["routable"] & (p <= s.mod_threshold)
        if s.mod_decode_threshold is not None:
            skip |= mod["decode"] & (p < s.mod_decode_threshold)
        self.mod_last_skipped[i] = skip
        if s.mod_skip == "layer":  # skipped tokens are no keys of this layer, now or at later steps
            q = skip.shape[1]
            skipped = skip if valid.shape[1] == q else torch.cat([state["mod_skipped"][i], skip], dim=1)
            if state is not None:
                state.setdefault("mod_skipped", {})[i] = skipped
            processed = valid & ~skipped
            mask = _additive_mask(processed, q, dtype)
            positions = (processed.long().cumsum(1) - 1).clamp(min=0)[:, -q:]  # renumbered over processed tokens
            embeddings = self.rotary_emb(hidden, position_ids=positions)
        residual = hidden
        hidden = hidden + self._attention(layer, normed, mask, embeddings, cache)
        if s.mod_skip == "layer":
            hidden = torch.where(skip[..., None], residual, hidden)
        run = ~skip
        weight = p.to(dtype)[..., None]
        if bool(run.all()):
            return hidden + layer.mlp(layer.post_attention_layernorm(hidden)) * weight
        out = hidden.clone()
        selected = hidden[run]  # [tokens, d]: the MLP runs for these tokens only
        out[run] = selected + layer.mlp(layer.post_attention_layernorm(selected)) * weight[run]
        return out


_TEXT_CLASSES = {}


def _baselines_text_class(base: type) -> type:
    if base not in _TEXT_CLASSES:
        _TEXT_CLASSES[base] = type(f"Baselines{base.__name__}", (_BaselinesTextModel, base), {"__module__": __name__})
    return _TEXT_CLASSES[base]


class LlavaBaselinesForConditionalGeneration(LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration with FastV or gamma-MoD inference, selected by the config (see the module)."""

    config_class = LlavaBaselinesConfig

    def __init__(self, config):
        super().__init__(config)
        settings = BaselineSettings.from_config(config)
        lm = self.model.language_model
        lm.__class__ = _baselines_text_class(type(lm))
        lm._baselines = settings
        if settings.mod_layers:
            hidden = config.text_config.hidden_size
            setattr(lm, ROUTER, nn.Linear(hidden, 2, bias=settings.mod_router_bias))
        self.post_init()

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                logits_to_keep=0, mod_routable_mask=None, fastv_query_index=None, **kwargs):
        """LlavaForConditionalGeneration.forward, plus (read at the prefill only) `mod_routable_mask` [batch, seq]
        bool: more routable positions; `fastv_query_index` (int or [batch]): FastV's ranking query."""
        lm = self.model.language_model
        lm._baselines_batch = {"input_ids": input_ids, "mod_routable_mask": mod_routable_mask,
                               "fastv_query_index": fastv_query_index}
        try:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   position_ids=position_ids, inputs_embeds=inputs_embeds,
                                   logits_to_keep=logits_to_keep, **kwargs)
        finally:
            lm._baselines_batch = None


def kept_image_tokens(n: int, r: float) -> int:
    """How many of n image tokens FastV keeps: round(n * (1 - r))."""
    return round(n * (1 - r))


__all__ = ["LlavaBaselinesConfig", "LlavaBaselinesForConditionalGeneration", "BaselineSettings", "kept_image_tokens"]
