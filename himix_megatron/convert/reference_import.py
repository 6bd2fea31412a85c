"""Import a checkpoint trained by the authors' reference code (github.com/Xuange923/HiMix, on TinyLLaVA
Factory) into a megatron checkpoint at any TP/PP.

The reference code writes one of two layouts (tinyllava/training_recipe/base.py, `save`):

- **pretrain** (lines 115-132): `<dir>/language_model/` (`pytorch_model.bin` + the text `config.json`) and
  `<dir>/vision_tower/` (`pytorch_model.bin` + the SiglipVisionConfig), names as in LlamaForCausalLM /
  Qwen2ForCausalLM and SiglipVisionModel (`vision_model.*`); the top dir also holds the tokenizer and the
  TinyLLaVA `config.json` (lines 101-105).
- **finetune** (lines 109-113, `trainer.save_model`; also every Trainer `checkpoint-N/`): one model directory,
  safetensors or `.bin`, sharded or not, whose tensors are `language_model.<LM name>` and
  `vision_tower._vision_tower.<SiglipVisionModel name>`, with the TinyLLaVA `config.json` (model_type
  "tinyllava": `text_config`, `vision_config`, `vision_feature_layer`, `vision_feature_select_strategy`).

Both layouts are recognised, with `.bin` or safetensors, sharded or not (`hf_files.HFTensors`). A renaming view,
`ReferenceTensors`, presents the reference LM under the names the existing import (`hf_import.fill_from_hf`)
reads, and its HiMix tensors under the names of our own HF export (`hf/modeling_himix.py`), which
`himix_tensor` maps onto megatron (the same mapping would import our own HiMix exports):

    reference (per decoder layer i, after the LM prefix)   ours (HF export)             megatron
    model.layers.i.input_layernorm_img.weight              self_attn.vision_norm.weight  self_attention.vision_norm
    model.layers.i.self_attn.k_proj_img.{weight,bias}      self_attn.vision_k_proj.*     self_attention.linear_kv_vision
    model.layers.i.self_attn.v_proj_img.{weight,bias}      self_attn.vision_v_proj.*       (fused per group [k_g; v_g])

(`.bias` only for Qwen2.) Every other LM tensor keeps its LlamaForCausalLM name and goes through
`layout.megatron_lm_tensor` as in a plain HF import; the SigLIP tower goes through `load_hf_siglip_state_dict`.
Nothing is newly initialised: a tensor that is missing, has the wrong shape, or is not understood is an error
naming the file and the tensor, before any rank starts.

Configs. The LM config is `language_model/config.json` (pretrain) or the TinyLLaVA config's `text_config`. The
reference pins transformers 4.44 (pyproject.toml line 17), which saves a nested config as a *diff*: a
`text_config` field is dropped when it equals transformers 4.44's `LlamaConfig()` default (TinyLlavaConfig's
default text config, configuration_tinyllava.py lines 97-100; transformers' `recursive_diff_dict`). Vicuna-7B's
shape *is* that default, so such fields are filled back from `_LLAMA_444_DEFAULTS`, not from whatever
transformers is installed here. The vision config's dropped fields are SigLIP defaults, which
`layout.vision_from_hf` fills.

The math, checked against the reference at commit 417fac3 (file: lines), and found equal to ours (DESIGN.md
section 1) for these checkpoints:

- RMSNorm_v: one `input_layernorm_img` per layer over d_v with the LM's `rms_norm_eps`
  (llm/modeling_files/modeling_llama.py: 796; modeling_qwen2.py: 859), applied to the vision features right
  before the vision K/V projections (llama: 837-838, 843; qwen2: 896-897), to the *same* features in every
  layer: `hidden_states_img = inputs_embeds_img` (llama: 1141; qwen2: 1167) is never updated across layers
  (llama replaces it only under the `output_hidden_states_img` forward flag, 1187-1188; that is a
  debugging/inspection switch, not a trained property, and nothing in the recipes sets it).
  RMSNorm itself: fp32 rsqrt(mean(x^2) + eps), times weight (llama: 124-138; qwen2: 196-210).
- Vision K/V: `k_proj_img` / `v_proj_img`: d_v -> n_kv_heads * head_dim, bias = `attention_bias` for Llama
  (llama: 375-376; we refuse attention_bias=True for Llama anyway, it also biases o_proj), always a bias for
  Qwen2 (qwen2: 356-359). head_dim = hidden_size // num_heads in both (llama: 358; qwen2: 339).
- K = [K_v ; K_t], V = [V_v ; V_t] along the sequence (llama: 404-409; qwen2: 387-392), GQA repeat after
  the concatenation (llama: 458-459; qwen2: 459-460), scores / sqrt(head_dim), one softmax over N + M
  (llama: 461-468; qwen2: 462-475).
- RoPE on the queries and the *text* keys only: the keys are split [img, text] and only the text part is
  rotated (llama eager/flash/sdpa: 445-447, 578-580, 732-734; qwen2: 427-450, 571-594, 771-794). Text
  positions are 0..M-1: the image placeholder is removed from the text (tinyllava/model/modeling_tinyllava.py:
  302-312) and positions restart at 0 (356, 370-371, 381; llama: 1121 / qwen2: 1147 when none are passed).
  Llama's RoPE is transformers' `ROPE_INIT_FUNCTIONS` (llama: 42, 186), so Llama-3 scaling is the same as
  ours; Qwen2's `Qwen2RotaryEmbedding(head_dim, base=rope_theta)` (qwen2: 217-250, 364-368) ignores any
  `rope_scaling`, so a Qwen2 config that sets one is refused (ours would apply it).
- Mask: every text query sees every vision key, and text keys causally: `causal_mask_img` is zeros and
  `causal_mask_txt` is triu(min, 1), concatenated [img, txt] (llama: 97-119; qwen2: 169-190) = bottom-right
  causal. The flash-attn path uses `is_causal=True` with flash-attn >= 2.1, also bottom-right (llama: 505-508,
  635; qwen2: 678), and the recipes train with `--attn_implementation flash_attention_2`
  (scripts/train/*/pretrain_*.sh, finetune_*.sh). The reference's SDPA path (llama: 761; qwen2: 819) falls back
  to PyTorch's top-left `is_causal=True` when no mask is built: wrong for N + M keys. A checkpoint does not
  record which attention trained it; one trained on that SDPA path would have learnt a different mask and no
  import can fix it (see DESIGN.md section 1).
- Vision features: SigLIP `hidden_states[vision_feature_layer]` then `[:, 1:]` for strategy "patch"
  (model/vision_tower/base.py: 56-60), raw, no connector: TinyLlavaForConditionalGeneration builds only
  `language_model` and `vision_tower` (modeling_tinyllava.py: 67-68) and feeds the features unchanged
  (256, 328-338, 407). Ours is the penultimate layer without post-layernorm, first patch dropped, so
  `vision_feature_layer` must be -2 (or L-1) and the strategy "patch" (the TinyLlavaConfig defaults,
  configuration_tinyllava.py: 27-28; but the CLI's `mm_vision_select_layer` defaults to -1,
  tinyllava/utils/arguments.py: 20, and configuration_tinyllava.py: 80 copies it, so this is checked).
- The MLP, residuals, norms and LM head are the base LM's (llama: 834-859; qwen2: 893-917).

Refused, because our model would compute something else: a vision feature layer other than the penultimate,
a "cls_patch" strategy, a non-SigLIP tower, Qwen2 `rope_scaling`, a `head_dim` field that is not
hidden_size // num_heads, an LM that `layout.language_from_hf` refuses (sliding window, MLP bias, ...), any
tensor we do not map (a connector, LoRA `lora_*` / `base_layer` names, a vision K/V bias on Llama), and an
unmerged LoRA directory (`adapter_config.json`).

Not carried by the checkpoint and so not checked: which attention implementation trained it (see Mask), and the
image preprocessing (`--image_aspect_ratio`). The conversation template (`--conv_version`) is not carried either:
the import records the authors' template for the decoder family (`templates.paper_template`: tinyllama, llama-3,
qwen2_base, told by the tokenizer's end token, else the config's model type) with its system prompt, unless
`template` names another. The reference feeds text-only samples a grey image (modeling_tinyllava.py: 291-298);
ours gives them no vision keys, which is a data-side difference, not a weight one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from himix_megatron.checkpoint import ModelDescription
from himix_megatron.config import LanguageModelConfig, ParallelConfig, validate
from himix_megatron.convert import layout
from himix_megatron.convert.hf_files import TOKENIZER_FILES, HFTensors, stage_tokenizer
from himix_megatron.convert.layout import ConversionError

LM_PREFIX = "language_model."  # finetune layout
VISION_PREFIX = "vision_tower._vision_tower."  # finetune layout; the SiglipVisionModel names follow
PRETRAIN_DIRS = ("language_model", "vision_tower")

# Defaults of transformers 4.44's LlamaConfig() for the fields `layout.language_from_hf` reads: what a
# `text_config` field saved by the reference's transformers (pinned to 4.44) had when the diff dropped it.
_LLAMA_444_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None, attention_bias=False, mlp_bias=False,
    bos_token_id=1, eos_token_id=2,  # read for generation_config.json when the tokenizer has none
)

# reference HiMix name (after "model.layers.{i}.") -> our HF export's name
_HIMIX_RENAMES = {
    "input_layernorm_img.weight": "self_attn.vision_norm.weight",
    "self_attn.k_proj_img.weight": "self_attn.vision_k_proj.weight",
    "self_attn.v_proj_img.weight": "self_attn.vision_v_proj.weight",
    "self_attn.k_proj_img.bias": "self_attn.vision_k_proj.bias",
    "self_attn.v_proj_img.bias": "self_attn.vision_v_proj.bias",
}
_HIMIX_WHAT = {"input_layernorm_img": "vision norm RMSNorm_v", "k_proj_img": "vision key projection",
               "v_proj_img": "vision value projection"}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer some transformers versions saved; not a weight


# --- the directory -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceCheckpoint:
    """Where a reference checkpoint's tensors and configs are (picklable, for the import ranks)."""

    kind: str  # "pretrain" or "finetune"
    root: str
    lm_dir: str  # directory of the LM weights
    lm_prefix: str  # "" (pretrain) or "language_model." (finetune)
    vision_dir: str
    lm_config: dict = field(repr=False)
    lm_config_where: str = ""
    vision_config: dict = field(repr=False, default_factory=dict)
    vision_config_where: str = ""
    top_config: Optional[dict] = field(repr=False, default=None)  # the TinyLLaVA config.json, when present
    tokenizer_dir: Optional[str] = None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot be read as JSON ({e})") from e


def _has_weights(directory: str) -> bool:
    try:
        HFTensors(directory)
    except ConversionError:
        return False
    return True


def _text_config(top: dict, where: str) -> dict:
    text = top.get("text_config")
    if not isinstance(text, dict) or "model_type" not in text:
        raise ConversionError(f"{where}: no text_config with a model_type (not a TinyLLaVA config)")
    return {**_LLAMA_444_DEFAULTS, **text}


def _vision_config(top: dict, where: str) -> dict:
    vision = top.get("vision_config")
    if not isinstance(vision, dict):
        raise ConversionError(f"{where}: no vision_config (not a TinyLLaVA config)")
    return vision


def find_reference(directory: str) -> ReferenceCheckpoint:
    """Recognise a reference checkpoint directory (pretrain or finetune layout); raises saying why not."""
    directory = os.path.normpath(directory)
    if not os.path.isdir(directory):
        raise ConversionError(f"{directory}: no such directory")
    if os.path.isfile(os.path.join(directory, "adapter_config.json")):
        raise ConversionError(f"{directory}: a LoRA adapter (adapter_config.json); merge it into the model with the "
                              "reference code (PeftModel.merge_and_unload, tinyllava/model/load_model.py) and save "
                              "that, then import the merged checkpoint")
    top_where = os.path.join(directory, "config.json")
    top = _read_json(top_where) if os.path.isfile(top_where) else None
    if top is not None and top.get("model_type") != "tinyllava":
        top = None  # not the TinyLLaVA config (e.g. someone's plain HF model): its fields mean something else
    sub = {name: os.path.join(directory, name) for name in PRETRAIN_DIRS}
    present = {name: os.path.isdir(path) and _has_weights(path) for name, path in sub.items()}
    top_weights = _has_weights(directory)
    finetune = top_weights and any(k.startswith(LM_PREFIX) for k in HFTensors(directory))
    tokenizer_candidates = [sub["language_model"], directory]

    if all(present.values()):
        if finetune:
            raise ConversionError(f"{directory}: holds both layouts (language_model/ + vision_tower/, and top-level "
                                  f"weights named {LM_PREFIX}*); pass a directory with one of them")
        connector = os.path.join(directory, "connector")
        if os.path.isdir(connector) and _has_weights(connector):
            raise ConversionError(f"{connector}: a connector; HiMix has none (the reference's "
                                  "TinyLlavaForConditionalGeneration builds none), so this is not a HiMix checkpoint")
        def config_of(folder: str, section: str, from_top):  # the folder's own config, else the TinyLLaVA one's
            where = os.path.join(folder, "config.json")
            if os.path.isfile(where):
                return _read_json(where), where
            if top is None:
                raise ConversionError(f"{folder}: no config.json, and {directory} has no TinyLLaVA config.json "
                                      f"to take the {section.replace('_', ' ')} from")
            where = f"{top_where} ({section})"
            return from_top(top, where), where

        lm_cfg, lm_where = config_of(sub["language_model"], "text_config", _text_config)
        vision_cfg, vision_where = config_of(sub["vision_tower"], "vision_config", _vision_config)
        return ReferenceCheckpoint("pretrain", directory, sub["language_model"], "", sub["vision_tower"], lm_cfg,
                                   lm_where, vision_cfg, vision_where, top, _tokenizer_dir(tokenizer_candidates))
    if finetune:
        if top is None:
            raise ConversionError(f"{directory}: weights named {LM_PREFIX}* (the finetune layout) but no TinyLLaVA "
                                  "config.json (model_type 'tinyllava') next to them")
        lm_where, vision_where = f"{top_where} (text_config)", f"{top_where} (vision_config)"
        return ReferenceCheckpoint("finetune", directory, directory, LM_PREFIX, directory,
                                   _text_config(top, lm_where), lm_where, _vision_config(top, vision_where),
                                   vision_where, top, _tokenizer_dir([directory]))
    found = [f"{name}/" for name, ok in present.items() if ok]
    raise ConversionError(
        f"{directory}: not a HiMix reference checkpoint in either layout: expected the pretrain layout "
        "(subdirectories language_model/ and vision_tower/, each with pytorch_model.bin or safetensors) or the "
        f"finetune layout (one model directory whose weights are named {LM_PREFIX}* and {VISION_PREFIX}*, with a "
        f"TinyLLaVA config.json); found {', '.join(found) + ' only' if found else 'neither'}"
        + ("" if found or not top_weights else f", and top-level weights without a {LM_PREFIX} prefix"))


def _tokenizer_dir(candidates: Sequence[str]) -> Optional[str]:
    for directory in candidates:
        if any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES if n != "generation_config.json"):
            return directory
    return None


# --- the tensors ----------------------------------------------------------------------------------------


def _weights_file(tensors: HFTensors, key: Optional[str] = None) -> str:
    """The file holding `key`, or (key None or absent) the file naming all weights: an index or the one file."""
    files = getattr(tensors, "_file_of", {})
    if key is not None and key in files:
        return os.path.join(tensors.directory, files[key])
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(tensors.directory, index)):
            return os.path.join(tensors.directory, index)
    names = sorted(set(files.values()))
    if len(names) == 1:
        return os.path.join(tensors.directory, names[0])
    return f"{tensors.directory} ({', '.join(names)})"


class ReferenceTensors(Mapping):
    """The reference LM's tensors under the names `hf_import` reads: LlamaForCausalLM names (prefix removed)
    and, for HiMix, our HF export's names (`_HIMIX_RENAMES`). Lazy, like the HFTensors underneath."""

    def __init__(self, tensors: HFTensors, prefix: str, tie_embeddings: bool):
        self.tensors = tensors
        self.directory = tensors.directory
        self.prefix = prefix
        self._source: dict[str, str] = {}  # our name -> the reference's key
        self.unmapped: list[str] = []  # reference keys under the prefix that mean nothing to us
        for key in tensors:
            if not key.startswith(prefix) or _IGNORED.fullmatch(key):
                continue
            name = key[len(prefix):]
            match = _LAYER_KEY.fullmatch(name)
            if match and match.group(2) in _HIMIX_RENAMES:
                name = f"model.layers.{match.group(1)}.{_HIMIX_RENAMES[match.group(2)]}"
            self._source[name] = key
        # Tied embeddings: a save may keep either of the two aliases (transformers drops one of a shared pair).
        if tie_embeddings and "model.embed_tokens.weight" not in self._source and "lm_head.weight" in self._source:
            self._source["model.embed_tokens.weight"] = self._source.pop("lm_head.weight")

    def reference_name(self, name: str) -> str:
        """The reference's key for one of our names (also for names that are absent)."""
        if name in self._source:
            return self._source[name]
        match = _LAYER_KEY.fullmatch(name)
        if match:
            back = {v: k for k, v in _HIMIX_RENAMES.items()}
            if match.group(2) in back:
                return f"{self.prefix}model.layers.{match.group(1)}.{back[match.group(2)]}"
        return self.prefix + name

    def file_of(self, name: str) -> str:
        return _weights_file(self.tensors, self._source.get(name))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors.shape(self._source[name])

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[self._source[name]]

    def __contains__(self, name) -> bool:
        return name in self._source

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def himix_hf_shapes(lm: LanguageModelConfig, vision_hidden: int) -> dict[str, tuple[int, ...]]:
    """Our HF export's names and shapes of every HiMix tensor (bias for Qwen2)."""
    shapes = {}
    for i in range(lm.num_layers):
        p = f"model.layers.{i}.self_attn."
        shapes[p + "vision_norm.weight"] = (vision_hidden,)
        for x in ("k", "v"):
            shapes[f"{p}vision_{x}_proj.weight"] = (lm.kv_dim, vision_hidden)
            if lm.qkv_bias:
                shapes[f"{p}vision_{x}_proj.bias"] = (lm.kv_dim,)
    return shapes


def open_tensors(ref: ReferenceCheckpoint, lm: LanguageModelConfig) -> tuple[ReferenceTensors, HFTensors]:
    """(the LM view, the SigLIP tensors) of a reference checkpoint; the finetune layout shares one reader."""
    lm_files = HFTensors(ref.lm_dir)
    vision_files = lm_files if ref.vision_dir == ref.lm_dir else HFTensors(ref.vision_dir)
    return ReferenceTensors(lm_files, ref.lm_prefix, lm.tie_embeddings), vision_files


def _check_lm_tensors(view: ReferenceTensors, lm: LanguageModelConfig, vision_hidden: int, config_where: str) -> None:
    layers_with_himix = {int(m.group(1)) for n in view if (m := _LAYER_KEY.fullmatch(n)) and "vision_" in m.group(2)}
    if not layers_with_himix:
        raise ConversionError(
            f"{_weights_file(view.tensors)}: no HiMix tensors (input_layernorm_img, self_attn.k_proj_img, "
            "self_attn.v_proj_img) in any decoder layer: not a HiMix checkpoint (a plain LLM or LLaVA?)")
    expected = {**layout.lm_hf_shapes(lm), **himix_hf_shapes(lm, vision_hidden)}
    for name, shape in expected.items():
        match = _LAYER_KEY.fullmatch(name)
        if name not in view:
            where = _weights_file(view.tensors)
            ref_name = view.reference_name(name)
            if match and "vision_" in match.group(2):
                module = ref_name.rsplit(".", 2)[-2]
                raise ConversionError(
                    f"{where}: layer {match.group(1)} has no {ref_name!r} (HiMix's {_HIMIX_WHAT[module]}); every "
                    "decoder layer of a HiMix reference checkpoint has input_layernorm_img.weight, "
                    "self_attn.k_proj_img.weight and self_attn.v_proj_img.weight"
                    + (" (+ .bias for Qwen2)" if lm.qkv_bias else ""))
            raise ConversionError(f"{where}: missing language model tensor {ref_name!r}")
        found = view.shape(name)
        if tuple(found) != tuple(shape):
            raise ConversionError(f"{view.file_of(name)}: tensor {view.reference_name(name)!r} has shape "
                                  f"{tuple(found)}; {config_where} implies {tuple(shape)}")
    allowed = set(expected) | ({"lm_head.weight"} if lm.tie_embeddings else set())
    if lm.tie_embeddings and "lm_head.weight" in view and "model.embed_tokens.weight" in view:
        # One of the two is dropped: only if they are the one shared matrix they should be.
        embed, head = view["model.embed_tokens.weight"], view["lm_head.weight"]
        if embed.shape != head.shape or not torch.equal(embed, head):
            raise ConversionError(
                f"{view.file_of('lm_head.weight')}: {config_where} ties the embeddings, but "
                f"{view.reference_name('lm_head.weight')!r} differs from {view.reference_name('model.embed_tokens.weight')!r}; "
                "refusing to drop one of them (untie them in the config if both were trained)")
    extra = sorted((n for n in view if n not in allowed), key=lambda n: (len(n), n))
    if extra:
        family = "Qwen2" if lm.qkv_bias else "Llama"
        raise ConversionError(
            f"{view.file_of(extra[0])}: {len(extra)} language model tensor(s) that a HiMix {family} "
            f"decoder does not have, e.g. {[view.reference_name(n) for n in extra[:4]]}; refusing to drop them "
            "(a connector, unmerged LoRA weights, or a vision K/V bias on a Llama without attention_bias?)")


def _check_top_level(ref: ReferenceCheckpoint) -> None:
    """Finetune layout: every tensor belongs to the LM or to the SigLIP tower."""
    if ref.kind != "finetune":
        return
    tensors = HFTensors(ref.root)
    extra = sorted(k for k in tensors if not k.startswith((LM_PREFIX, VISION_PREFIX)))
    if extra:
        raise ConversionError(f"{_weights_file(tensors, extra[0])}: {len(extra)} tensor(s) outside "
                              f"{LM_PREFIX}* and {VISION_PREFIX}*, e.g. {extra[:4]}; HiMix has no connector or other "
                              "modules, so this is not a HiMix reference checkpoint")
    if not any(k.startswith(VISION_PREFIX + "vision_model.") for k in tensors):
        raise ConversionError(f"{_weights_file(tensors)}: no SigLIP tower ({VISION_PREFIX}vision_model.*)")


# --- the math: refuse what weights cannot fix ------------------------------------------------------------


def _check_text_math(ref: ReferenceCheckpoint, lm_cfg: dict) -> None:
    """Before `layout.language_from_hf`, whose refusals are about our model, not about the reference's."""
    where = ref.lm_config_where
    heads, hidden = lm_cfg.get("num_attention_heads"), lm_cfg.get("hidden_size")
    if heads and hidden and lm_cfg.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"{where}: head_dim={lm_cfg['head_dim']} but the reference attention computes "
                              f"head_dim = hidden_size // num_attention_heads = {hidden // heads} "
                              "(modeling_llama.py line 358, modeling_qwen2.py line 339)")
    if lm_cfg.get("model_type") == "qwen2" and lm_cfg.get("rope_scaling"):
        raise ConversionError(f"{where}: rope_scaling={lm_cfg['rope_scaling']!r}: the reference Qwen2 attention "
                              "ignores it (plain RoPE, modeling_qwen2.py lines 364-368) and our model would apply "
                              "it, so the logits would differ")


def _check_vision_math(ref: ReferenceCheckpoint, lm_cfg: dict, vision_layers: int, vision_hidden: int) -> None:
    where = ref.lm_config_where
    declared = lm_cfg.get("vision_hidden_size")
    if declared is not None and declared != vision_hidden:
        raise ConversionError(f"{where}: vision_hidden_size={declared}, but the vision tower "
                              f"({ref.vision_config_where}) has hidden_size={vision_hidden}")
    top = ref.top_config or {}
    top_where = os.path.join(ref.root, "config.json")
    layer = top.get("vision_feature_layer", -2)
    if layer not in (-2, vision_layers - 1):
        raise ConversionError(
            f"{top_where}: vision_feature_layer={layer}: the reference fed the LM SigLIP hidden_states[{layer}] "
            "(vision_tower/base.py line 57); our encoder computes the penultimate layer (hidden_states[-2]) only")
    strategy = top.get("vision_feature_select_strategy", "patch")
    if strategy != "patch":
        raise ConversionError(
            f"{top_where}: vision_feature_select_strategy={strategy!r}: our encoder drops the first patch as "
            "'patch' does (vision_tower/base.py lines 59-60); other selections are not implemented")


# --- plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferencePlan:
    """Everything an import rank needs (picklable)."""

    reference: ReferenceCheckpoint
    description: ModelDescription
    parallel: ParallelConfig
    warnings: tuple[str, ...] = ()


def plan_reference(directory: str, parallel: ParallelConfig, template: Optional[str] = None) -> ReferencePlan:
    """Recognise and check a reference checkpoint against `parallel`; raises naming the file, field or tensor."""
    from himix_megatron.convert.hf_import import recorded_prompt
    from himix_megatron.model.vision import _vision_prefix, build_vision_config

    recorded_prompt(template, "--template")  # a bad name is refused before any file is read
    ref = find_reference(directory)
    base = os.path.basename(ref.root)
    _check_text_math(ref, ref.lm_config)
    lm = layout.language_from_hf(ref.lm_config, f"reference:{base}", ref.lm_config_where)
    vision = layout.vision_from_hf(ref.vision_config, f"reference:{base}/vision_tower", ref.vision_config_where)
    if vision.kind != "siglip":  # HiMix's reference code builds only SigLIP towers
        raise ConversionError(f"{ref.vision_config_where}: a {layout.TOWER_NAMES[vision.kind]} vision tower; the "
                              "reference checkpoints HiMix's code writes have a SigLIP one")
    _check_vision_math(ref, ref.lm_config, vision.num_layers, vision.hidden_size)
    validate(lm, parallel, "himix")
    build_vision_config(vision, parallel)  # TP must divide the vision heads and FFN too
    _check_top_level(ref)
    view, vision_tensors = open_tensors(ref, lm)
    _check_lm_tensors(view, lm, vision.hidden_size, ref.lm_config_where)
    prefix = _vision_prefix(vision_tensors)
    for key, shape in layout.vision_hf_shapes(vision).items():
        key = prefix + key
        if key not in vision_tensors:
            raise ConversionError(f"{_weights_file(vision_tensors)}: missing vision tower tensor {key!r}")
        if tuple(vision_tensors.shape(key)) != tuple(shape):
            raise ConversionError(f"{_weights_file(vision_tensors, key)}: vision tower tensor {key!r} has shape "
                                  f"{tuple(vision_tensors.shape(key))}; {ref.vision_config_where} implies {shape}")
    warnings = ()
    if ref.top_config is None:
        warnings = (f"{ref.root} has no TinyLLaVA config.json (the reference writes one next to language_model/ "
                    "and vision_tower/): its vision_feature_layer and vision_feature_select_strategy are unknown; "
                    "assuming the recipes' -2 and 'patch', which is what our model computes",)
    template, system = recorded_prompt(template or _paper_template(ref), "--template")
    return ReferencePlan(ref, ModelDescription("himix", lm, vision, template, system_prompt=system), parallel, warnings)


def _paper_template(ref: ReferenceCheckpoint) -> str:
    """The authors' template for the reference's decoder: qwen2_base for Qwen2; for a Llama, tinyllama (Vicuna,
    TinyLlama) or llama-3 (Llama-3.2) by its tokenizer's end token, else by its vocabulary size."""
    from himix_megatron.data.records import DataError
    from himix_megatron.data.templates import paper_template
    from himix_megatron.data.tokenizer import load_tokenizer

    if ref.lm_config.get("model_type") == "qwen2":
        return "qwen2_base"
    if ref.tokenizer_dir is not None:
        try:
            return paper_template(load_tokenizer(ref.tokenizer_dir))
        except DataError:
            pass
    return "llama-3" if int(ref.lm_config.get("vocab_size", 0)) >= 128000 else "tinyllama"


# --- fill a rank's model ----------------------------------------------------------------------------------


def himix_tensor(name: str, lm: LanguageModelConfig, tensors: Mapping[str, Tensor]) -> Optional[Tensor]:
    """The full (TP=1) value of HiMix megatron parameter `name` (global layer number) from tensors named as our
    HF export names them, or None when `name` is not one of HiMix's vision norm / K/V parameters."""
    match = layout._LAYER.fullmatch(name)
    if not match:
        return None
    p, rest = f"model.layers.{match.group(1)}.self_attn.", match.group(2)
    if rest in ("self_attention.vision_norm.weight", "self_attention.linear_kv_vision.layer_norm_weight"):
        return tensors[p + "vision_norm.weight"]
    if rest in ("self_attention.linear_kv_vision.weight", "self_attention.linear_kv_vision.bias"):
        kind = rest.rsplit(".", 1)[1]
        return layout.fuse_kv(tensors[f"{p}vision_k_proj.{kind}"], tensors[f"{p}vision_v_proj.{kind}"], lm)
    return None


def fill_from_reference(model_chunks: Sequence[torch.nn.Module], encoder, description: ModelDescription,
                        lm_tensors: Mapping[str, Tensor], vision_tensors: Optional[Mapping[str, Tensor]]
                        ) -> tuple[list[str], list[str]]:
    """Copy a reference checkpoint into this rank's chunks (and encoder): the LM and SigLIP as a plain HF import
    does, then HiMix's vision norm and K/V. Returns (parameters left without a source, unused SigLIP names)."""
    from megatron.core import parallel_state

    from himix_megatron.convert.hf_import import _global_name, fill_from_hf

    new, unused = fill_from_hf(model_chunks, encoder, description, lm_tensors, vision_tensors)
    lm = description.language
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    filled = set()
    with torch.no_grad():
        for chunk in model_chunks:
            chunk = getattr(chunk, "module", chunk)
            for name, param in chunk.named_parameters():
                gname = _global_name(name, chunk)
                full = himix_tensor(gname, lm, lm_tensors)
                if full is None:
                    continue
                shape = layout.full_shape(param, size)
                if tuple(full.shape) != shape:
                    raise ConversionError(f"megatron parameter {gname!r}: the reference gives shape "
                                          f"{tuple(full.shape)}, the model has {shape}")
                param.copy_(layout.shard(gname, full, param, rank, size))
                filled.add(gname)
    return [n for n in new if n not in filled], unused


# --- the import -----------------------------------------------------------------------------------------


def _reference_rank(rank: int, world: int, port: int, plan: ReferencePlan, tmp: str, staging: str) -> None:
    from himix_megatron import platform
    from himix_megatron.checkpoint import build_model
    from himix_megatron.convert.hf_import import rank_environment, save_imported

    rank_environment(rank, world, port)

    platform.initialize(plan.parallel, use_gpu=False)  # a format conversion: CPU, gloo, local spec on any node
    try:
        # With initialisation: megatron sets the tensor-parallel attributes `layout.shard` reads only then.
        chunks, encoder = build_model(plan.description, plan.parallel)
        lm_tensors, vision = open_tensors(plan.reference, plan.description.language)
        missing, unused = fill_from_reference(chunks, encoder, plan.description, lm_tensors,
                                              vision if encoder is not None else None)
        if missing:
            raise ConversionError(f"no source in the reference checkpoint for {missing}")
        save_imported(rank, chunks, encoder, plan.description, vision, unused, tmp, staging,
                      {"unused_vision": unused})
    finally:
        platform.shutdown()


def import_reference(directory: str, parallel: ParallelConfig, output: str, *, template: Optional[str] = None,
                     log: Callable[[str], None] = print):
    """Convert a reference checkpoint directory, at `parallel`'s TP x PP (that many processes), into the
    checkpoint directory `output` (which appears only when complete). Returns an `hf_import.ImportReport`."""
    from himix_megatron.convert.hf_import import VISION_EXTRA, ImportReport, spawn_import

    output = os.path.normpath(output)
    if os.path.exists(output):
        raise ConversionError(f"--output {output} already exists; refusing to overwrite it")
    plan = plan_reference(directory, parallel, template)
    ref = plan.reference
    for warning in plan.warnings:
        log(f"warning: {warning}")

    def tokenizer(target: str) -> list[str]:
        if ref.tokenizer_dir is not None:
            return stage_tokenizer(ref.tokenizer_dir, target, ref.lm_config)
        os.makedirs(target)
        log(f"warning: no tokenizer files in {ref.root} or its language_model/; the checkpoint will have none")
        return []

    results, tokenizer_files = spawn_import(_reference_rank, plan, parallel, output, tokenizer)
    unused = results[0]["unused_vision"]
    report = ImportReport(output, plan.description, [], unused, tokenizer_files)
    d = plan.description
    log(f"imported the HiMix reference checkpoint {ref.root} ({ref.kind} layout; {d.language.num_layers}-layer "
        f"{'Qwen2' if d.language.qkv_bias else 'Llama'} + SigLIP d_v={d.vision.hidden_size}) at "
        f"TP={parallel.tensor_model_parallel_size} PP={parallel.pipeline_model_parallel_size} -> {output}")
    log("every parameter came from the reference checkpoint (none newly initialised)")
    log(f"SigLIP tensors the encoder does not use (kept in {VISION_EXTRA}), {len(unused)}")
    log(f"tokenizer files ({ref.tokenizer_dir or 'none'}): {', '.join(tokenizer_files) or 'none'}")
    return report
