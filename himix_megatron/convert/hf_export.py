"""A megatron checkpoint of any TP/PP -> a Hugging Face model directory.

A dist checkpoint is layout-free, so the export loads it into a TP=1/PP=1 model in this process
(a world of one) and maps the full tensors to HF names:

- arch himix: a remote-code directory (`trust_remote_code=True`): himix_megatron/hf's
  `HiMixForCausalLM`, the weights as `model.*`, `lm_head.weight`, `vision_tower.vision_model.*`.
- arch vanilla: transformers' own `LlavaForConditionalGeneration` (no remote code), in the on-disk layout
  transformers 4 and 5 both load (`language_model.model.*`, `multi_modal_projector.*`,
  `vision_tower.vision_model.*`). `vision_feature_select_strategy="default"` drops the first token like
  our encoder (SigLIP's first patch, CLIP's class token). `<image>` is added to the tokenizer; its id is
  the first one past the tokenizer's vocabulary, and the embedding (and untied LM head) grows by zero rows when that id is past the
  model's vocabulary. Zero rows: the image token's embedding is always replaced by the image
  features. Whenever `<image>` has a row in the LM head, generation_config.json suppresses it.
- arch vanilla with a baseline switched on (`baselines`: FastV's fastv_k / fastv_r / fastv_ranking, gamma-MoD's
  mod_* fields, himix_megatron/hf/modeling_llava_baselines.py): a remote-code directory, model_type
  "llava_baselines", `LlavaBaselinesForConditionalGeneration` (AutoModelForCausalLM / AutoModel /
  AutoModelForImageTextToText, `trust_remote_code=True`), the fields in config.json, the weights under
  transformers 5's module names (`model.language_model.*`, `model.vision_tower.*`,
  `model.multi_modal_projector.*`, `lm_head.weight`): transformers applies no renaming to remote code.
- arch uniform / hierarchical are the paper's ablations and have no HF model: refused.

The vision tower follows the encoder's kind: a SiglipVisionModel (SiglipVisionConfig, SiglipImageProcessor) or a
CLIPVisionModel (CLIPVisionConfig, CLIPImageProcessor: shortest edge, centre crop, OpenAI mean / std), configured
as the loader preprocesses (`data.image.image_config_for`). It is written whole when the tensors our encoder does
not hold (last layer, post_layernorm, SigLIP's head) are available, from `--hf-vision` or the checkpoint's
`hf_vision_extra.safetensors` (written by the import), with `vision_feature_layer = -2`. Otherwise the
tower is written without its last layer and with `vision_feature_layer = -1`, which selects the same
features; its post_layernorm, which no feature passes through, is then the identity (ones, zeros).

For arch himix the export also holds a remote-code `HiMixProcessor` (processor_config.json; AutoProcessor) and, in
chat_template.jinja, the conversation template the model was trained with (the checkpoint's, with its recorded
system prompt as the default) as a Jinja chat template: `processor.apply_chat_template(messages,
add_generation_prompt=True)` and then `processor(text=..., images=...)` give exactly the ids of
`himix_megatron.data.templates.generation_prompt` (checked during the export on sample questions, with the
recorded, another and an empty system prompt), so generic harnesses (lmms-eval's `huggingface` model) prompt
it as it was trained. The vanilla export's LlavaProcessor gets the same kind of chat_template.jinja, checked the
same way through the processor (which expands `<image>` to the N image tokens where training's image id sat), so
lmms-eval's `llava_hf` prompts it as it was trained, without `--force_simple`.

config.json records `himix_tested_transformers`, the range of transformers releases the export is tested with
(himix_megatron/hf's TESTED_TRANSFORMERS).

The output directory appears only when complete (written to `<output>.tmp-<pid>`, then renamed).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from typing import Callable, Optional

import torch

from himix_megatron.convert import layout
from himix_megatron.convert.hf_files import TOKENIZER_FILES, HFTensors, write_safetensors
from himix_megatron.convert.hf_import import VISION_EXTRA
from himix_megatron.convert.layout import ConversionError
from himix_megatron.hf import TESTED_TRANSFORMERS, TESTED_TRANSFORMERS_KEY

IMAGE_TOKEN = "<image>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Jinja chat templates that render the prompt string of himix_megatron.data.templates, `<image>` placeholders
# included; HiMixProcessor then tokenizes it as training does (split at `<image>`, each piece as
# `tokenizer(piece)`, the image ids dropped). A user message's images give `<image>\n` in front of its text (the
# text parts joined by "\n"), stripped as training strips it. No BOS here: tokenizing the first piece adds it.
# A system message replaces the recorded system prompt ("" drops it); `{SYSTEM}` is filled in below with the one
# the model was trained with, since harnesses (lmms-eval) send no system message by default.
_JINJA_COMMON = r"""{%- macro himix_text(message) -%}
{%- if message['content'] is string -%}{{ message['content'] }}
{%- else -%}{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n') }}
{%- endif -%}
{%- endmacro -%}
{%- macro himix_question(message) -%}
{%- set images = 0 if message['content'] is string else
    message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}
{%- if images -%}{{ ('<image>' * images + {AFTER_IMAGE} + '\n' + himix_text(message)) | trim }}{%- else -%}{{ himix_text(message) }}{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = himix_text(messages[0]) -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system = {SYSTEM} -%}{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
{{- raise_exception('HiMix conversations are an optional system message, then user and assistant turns '
                    'in turn, starting with the user') -}}
{%- endif -%}
{%- endfor -%}
"""
# {system} USER: {q} ASSISTANT: {a}{end}USER: {q2} ASSISTANT:
_VICUNA_STYLE = r"""{%- if system -%}{{- system + ' ' -}}{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}
{{- 'USER: ' + himix_question(message) + ' ' -}}
{%- if loop.last and add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
{%- else -%}
{{- 'ASSISTANT: ' + himix_text(message) + '{END}' -}}
{%- endif -%}
{%- endfor -%}"""
_JINJA_BODIES = {
    "tinyllama": _VICUNA_STYLE.replace("{END}", "</s>"),
    "llama-3": _VICUNA_STYLE.replace("{END}", "<|end_of_text|>"),
    "qwen2_base": _VICUNA_STYLE.replace("{END}", "<|endoftext|>"),
    "llama3_instruct": r"""{%- if system -%}{{- '<|start_header_id|>system<|end_header_id|>\n\n' + system + '<|eot_id|>' -}}{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}
{{- '<|start_header_id|>user<|end_header_id|>\n\n' + himix_question(message) + '<|eot_id|>' -}}
{%- if loop.last and add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
{%- else -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' + himix_text(message) + '<|eot_id|>' -}}
{%- endif -%}
{%- endfor -%}""",
    "chatml": r"""{%- if system -%}{{- '<|im_start|>system\n' + system + '<|im_end|>\n' -}}{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}
{{- '<|im_start|>user\n' + himix_question(message) + '<|im_end|>\n' -}}
{%- if loop.last and add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
{%- else -%}
{{- '<|im_start|>assistant\n' + himix_text(message) + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}""",
    # Pretraining: "<image>{caption}\n" per round; the question is not part of the prompt (training ignores it).
    "pretrain": r"""{%- for message in turns -%}
{%- if message['role'] == 'user' -%}{{- '<image>' -}}
{%- else -%}{{- himix_text(message) + '\n' -}}{%- endif -%}
{%- endfor -%}""",
}


def chat_template(name: str, system: Optional[str], after_image: str = "") -> str:
    """The Jinja chat template equal to conversation template `name` with system prompt `system` (None: the
    template's default). `after_image` is written between a question's `<image>` placeholders and its "\\n": the
    vanilla export's " " for sentencepiece tokenizers with legacy=False (see `_vanilla_chat_template`)."""
    from himix_megatron.data.templates import TemplateConfig

    if name not in _JINJA_BODIES:
        raise ConversionError(f"conversation template {name!r} has no chat-template equivalent; the export "
                              f"writes one for {sorted(_JINJA_BODIES)}")
    system = TemplateConfig(name, system=system).system_prompt
    return (_JINJA_COMMON.replace("{SYSTEM}", json.dumps(system, ensure_ascii=False))
            .replace("{AFTER_IMAGE}", json.dumps(after_image)) + _JINJA_BODIES[name] + "\n")


def load_tp1(load_dir: str):
    """(description, iter dir, model chunks, encoder, stored dtype): the checkpoint at TP=1/PP=1, in this process.

    The description's vocab_size stays the real one; the model has the saved (padded) number of rows."""
    from megatron.core import dist_checkpointing, parallel_state

    from himix_megatron import platform
    from himix_megatron.checkpoint import build_model, load_checkpoint, read_description, resolve
    from himix_megatron.config import ParallelConfig

    description = read_description(load_dir)
    iter_dir = resolve(load_dir)
    platform.initialize(ParallelConfig(), use_gpu=False)  # a format conversion: CPU, gloo, local spec on any node
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ConversionError("export runs in a world of one process (TP=1, PP=1)")
    stored = dist_checkpointing.load_tensors_metadata(iter_dir)
    embedding = next((t for k, t in stored.items() if k.endswith("embedding.word_embeddings.weight")), None)
    if embedding is None:
        raise ConversionError(f"{iter_dir}: holds no embedding.word_embeddings.weight")
    # The saved vocabulary is padded for the TP it was saved at; build with exactly that many rows.
    lm = dataclasses.replace(description.language, vocab_size=embedding.global_shape[0])
    dtype = embedding.dtype if embedding.dtype in DTYPES.values() else torch.float32
    # Every weight comes from the checkpoint, so megatron's random init is skipped. (At TP=1 nothing reads
    # the tensor-parallel attributes megatron then leaves unset; the import, at TP > 1, keeps the init.)
    chunks, encoder = build_model(dataclasses.replace(description, language=lm), ParallelConfig(),
                                  params_dtype=dtype, perform_initialization=False, **gamma_mod_overrides(iter_dir))
    load_checkpoint(iter_dir, chunks, encoder=encoder, load_rng=False)
    return description, iter_dir, chunks, encoder, embedding.dtype


def gamma_mod_record(iter_dir: str) -> Optional[dict]:
    """The gamma-MoD settings a checkpoint records (model/gamma_mod.py), None for a dense model."""
    from himix_megatron.checkpoint import read_metadata

    return read_metadata(iter_dir)["train_state"].get("gamma_mod")


def gamma_mod_overrides(iter_dir: str) -> dict:
    from himix_megatron.model.gamma_mod import config_overrides

    record = gamma_mod_record(iter_dir)
    return {} if record is None else config_overrides(record)


def gamma_mod_baselines(record: dict) -> dict:
    """The HF baselines fields that reproduce the megatron gamma-MoD model's evaluation forward: the recorded
    layers, thresholds, router bias and skip rule, every token routable by the threshold (as the official
    inference and megatron's eval mode do)."""
    fields = {k: record[k] for k in ("mod_layers", "mod_threshold", "mod_decode_threshold", "mod_router_bias",
                                     "mod_skip")}
    return dict(fields, mod_layers=list(record["mod_layers"]), mod_route_text=True)


def _vision_tower(vision_state, v, iter_dir: str, hf_vision: Optional[str], log) -> tuple[dict, dict, int]:
    """(SiglipVisionModel / CLIPVisionModel-relative tensors, its config fields, vision_feature_layer)."""
    from himix_megatron.model.vision import _vision_prefix

    tower = layout.TOWER_NAMES[v.kind]
    tensors = layout.hf_vision_tensors(vision_state, v)
    config = layout.vision_to_hf(v)
    extra, where = None, None
    if hf_vision:
        source = HFTensors(hf_vision)
        prefix = _vision_prefix(source, tower)
        extra = {k[len(prefix):]: source[k] for k in source if k.startswith(prefix)}
        where = hf_vision
    elif os.path.isfile(os.path.join(iter_dir, VISION_EXTRA)):
        from safetensors.torch import load_file

        extra, where = load_file(os.path.join(iter_dir, VISION_EXTRA)), os.path.join(iter_dir, VISION_EXTRA)
    if extra is not None:
        needed = {k: s for k, s in layout.vision_hf_shapes(v, all_layers=True).items() if k not in tensors}
        for key, shape in needed.items():
            if key not in extra or tuple(extra[key].shape) != shape:
                raise ConversionError(f"{where}: {tower} tensor {key!r} is missing or not of shape {shape}")
        tensors.update({k: extra[k] for k in needed})
        if v.kind == "siglip":  # the pooling head is optional in SigLIP configs; CLIP towers have none
            head = [k for k in extra if k.startswith("head.")]
            tensors.update({k: extra[k] for k in head})
            config["vision_use_head"] = bool(head)
        return tensors, config, -2
    log(f"warning: the {tower} tensors our encoder does not hold (last layer, post_layernorm"
        f"{', head' if v.kind == 'siglip' else ''}) are not available (no --hf-vision, no {VISION_EXTRA}): writing "
        "the tower without its last layer, vision_feature_layer=-1 (the same features)")
    config["num_hidden_layers"] = v.num_layers - 1
    if v.kind == "siglip":
        config["vision_use_head"] = False
    tensors.update({"post_layernorm.weight": torch.ones(v.hidden_size),
                    "post_layernorm.bias": torch.zeros(v.hidden_size)})
    return tensors, config, -1


def _tokenizer(iter_dir: str, out: str, log) -> tuple[Optional[int], dict]:
    """Copy the tokenizer with `<image>` added; returns (its id or None without a tokenizer, special ids)."""
    src = os.path.join(iter_dir, "tokenizer")
    if not os.path.isdir(src):
        log("warning: the checkpoint has no tokenizer; none is written")
        return None, {}
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(out, name))
    ids = {}
    # generation_config.json (copied above) holds the ids `generate` stops on; the import writes one
    # from the LM's config.json when the model directory had none.
    if os.path.isfile(os.path.join(src, "generation_config.json")):
        with open(os.path.join(src, "generation_config.json"), encoding="utf-8") as f:
            ids = {k: v for k, v in json.load(f).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    try:
        from transformers import AddedToken, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
        # A checkpoint trained from scratch has no generation_config.json: the tokenizer's own
        # special tokens are then the ids to stop on.
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if ids.get(key) is None and getattr(tok, key, None) is not None:
                ids[key] = getattr(tok, key)
        if IMAGE_TOKEN not in tok.get_vocab():
            tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
            tok.save_pretrained(out)
        return tok.convert_tokens_to_ids(IMAGE_TOKEN), ids
    except Exception as e:  # noqa: BLE001 - a tokenizer transformers cannot read is copied as it is
        log(f"warning: transformers cannot load the tokenizer ({e}); copied without an {IMAGE_TOKEN} token")
        return None, ids


def _image_processor(v):
    """The tower's own transformers image processor, configured as the loader preprocesses for it
    (`data.image.image_config_for`), so exported models see training's pixels."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from himix_megatron.data.image import image_config_for

    cfg = image_config_for(v)
    common = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                  image_mean=list(cfg.channel_mean), image_std=list(cfg.channel_std))
    if cfg.resize_mode == "shortest_edge":
        return CLIPImageProcessor(size={"shortest_edge": cfg.size}, do_center_crop=True,
                                  crop_size={"height": cfg.size, "width": cfg.size}, **common)
    return SiglipImageProcessor(size={"height": cfg.size, "width": cfg.size}, **common)


def _export_himix(d, state, tower, vision_cfg, feature_layer, tmp, image_id, ids):
    from himix_megatron.hf import write_remote_code
    from himix_megatron.hf.configuration_himix import HiMixConfig

    tensors, leftover = layout.hf_lm_tensors(state, d.language)
    if leftover:
        raise ConversionError(f"no Hugging Face name for megatron parameters {leftover}")
    tensors.update({"vision_tower.vision_model." + k: t for k, t in tower.items()})
    fields = {k: v for k, v in layout.language_to_hf(d.language).items() if k not in ("model_type", "mlp_bias")}
    fields.update(ids, vision_config=vision_cfg, vision_hidden_size=d.vision.hidden_size,
                  vision_feature_layer=feature_layer, image_token_index=image_id, architectures=["HiMixForCausalLM"])
    config = HiMixConfig(**fields)
    config.auto_map = write_remote_code(tmp)
    _record_prompt(config, d)
    return tensors, config


def _export_vanilla(d, state, tower, vision_cfg, feature_layer, tmp, image_id, ids):
    from transformers import AutoConfig, LlavaConfig, LlamaConfig, Qwen2Config

    lm = d.language
    lm_tensors, leftover = layout.hf_lm_tensors(state, lm)
    projector = {"vision_projection.encoder.linear_fc1": "linear_1", "vision_projection.encoder.linear_fc2": "linear_2"}
    tensors = {}
    for name in leftover:
        module, kind = name.rsplit(".", 1)
        if module == "mod_router":  # gamma-MoD's shared router, in the language model (hf/modeling_llava_baselines)
            tensors[f"language_model.model.mod_router.{kind}"] = state[name]
            continue
        if module not in projector:
            raise ConversionError(f"no Hugging Face name for megatron parameter {name!r}")
        tensors[f"multi_modal_projector.{projector[module]}.{kind}"] = state[name]
    if image_id is None:
        raise ConversionError("the vanilla (LLaVA) export needs the checkpoint's tokenizer, to add an <image> token")
    vocab = max(lm.vocab_size, image_id + 1)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in lm_tensors:
            lm_tensors[key] = layout.pad_vocab(lm_tensors[key], vocab)
    tensors.update({"language_model." + k: t for k, t in lm_tensors.items()})
    tensors.update({"vision_tower.vision_model." + k: t for k, t in tower.items()})
    text_fields = {k: v for k, v in layout.language_to_hf(lm).items() if k != "model_type"}
    text_fields.update(ids, vocab_size=vocab)
    text = (Qwen2Config if lm.qkv_bias else LlamaConfig)(**text_fields)
    vision = AutoConfig.for_model(**vision_cfg)  # SiglipVisionConfig or CLIPVisionConfig, by model_type
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_id,
                         image_seq_length=d.vision.num_features, vision_feature_layer=feature_layer,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         multimodal_projector_bias=True, tie_word_embeddings=lm.tie_embeddings,
                         architectures=["LlavaForConditionalGeneration"], **ids)
    _record_prompt(config, d)
    return tensors, config


def _record_prompt(config, d) -> None:
    """The conversation template and exact system prompt of training, read by himix-eval (transformers keeps
    unknown config keys)."""
    if d.template:
        config.himix_template = d.template
        config.himix_system_prompt = _system_prompt(d)


# The vanilla export's on-disk LLaVA names -> transformers 5's module names (the baselines' remote code).
_LLAVA_MODULE_NAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                       ("vision_tower.", "model.vision_tower."),
                       ("multi_modal_projector.", "model.multi_modal_projector."))


def _check_baselines(baselines: dict, arch: str, num_layers: int) -> None:
    from himix_megatron.hf.modeling_llava_baselines import BaselineSettings

    if arch != "vanilla":
        raise ConversionError(f"FastV / gamma-MoD exports are of arch vanilla (LLaVA), not {arch!r}")
    try:
        BaselineSettings(image_token_id=0, **baselines).check(num_layers)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"baseline fields {baselines}: {e}") from e


def _vanilla_baselines(tensors: dict, config, tmp: str, baselines: dict):
    """The vanilla export as the remote-code LlavaBaselinesForConditionalGeneration with `baselines`' fields."""
    from himix_megatron.hf import write_baselines_code
    from himix_megatron.hf.modeling_llava_baselines import LlavaBaselinesConfig

    renamed = {}
    for key, tensor in tensors.items():
        match = [(o, n) for o, n in _LLAVA_MODULE_NAMES if key.startswith(o)]
        if not match:
            raise ConversionError(f"vanilla tensor {key!r} has no transformers 5 module name")
        renamed[match[0][1] + key[len(match[0][0]):]] = tensor
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version")}
    config = LlavaBaselinesConfig(**fields, **baselines)
    config.architectures = ["LlavaBaselinesForConditionalGeneration"]
    config.auto_map = write_baselines_code(tmp)
    return renamed, config


def export_checkpoint(load: str, output: str, *, hf_vision: Optional[str] = None, dtype: str = "auto",
                      max_shard_size="5GB", baselines: Optional[dict] = None,
                      log: Callable[[str], None] = print) -> str:
    """Write the HF directory `output` for the checkpoint `load` (a save dir or an iteration dir); `baselines`
    (arch vanilla): FastV / gamma-MoD config fields, e.g. {"fastv_k": 2, "fastv_r": 0.5}."""
    from himix_megatron.checkpoint import read_description, resolve

    output = os.path.normpath(output)
    if os.path.exists(output):
        raise ConversionError(f"--output {output} already exists; refusing to overwrite it")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose auto or one of {sorted(DTYPES)}")
    described = read_description(load)
    arch = described.arch
    if arch not in ("himix", "vanilla"):
        raise ConversionError(f"arch {arch!r} is one of the paper's ablations and has no Hugging Face model; "
                              "export supports arch himix (remote code) and vanilla (LlavaForConditionalGeneration)")
    record = gamma_mod_record(resolve(load))
    if record is not None:  # a gamma-MoD model exports as one: its router and settings
        if baselines and any(k.startswith("fastv") for k in baselines):
            raise ConversionError("a gamma-MoD checkpoint cannot also be exported with FastV (--fastv-k)")
        baselines = dict(gamma_mod_baselines(record), **(baselines or {}))
    if baselines:
        _check_baselines(baselines, arch, described.language.num_layers)
    if arch == "himix":
        if described.template is None:
            raise ConversionError(f"{load}: the checkpoint records no conversation template, so the export cannot "
                                  "write the chat template it was trained with; record it with "
                                  "`himix-train --load ... --template NAME` (a checkpoint of an earlier release)")
        template = described.template
        # Refuses, before anything is written, a template it cannot express (or a retired name).
        jinja = chat_template(template, _system_prompt(described, log))
    d, iter_dir, chunks, encoder, stored = load_tp1(load)
    state = {n: p.detach() for n, p in chunks[0].named_parameters()}
    vision_state = {n: p.detach() for n, p in encoder.named_parameters()}
    target = stored if dtype == "auto" else DTYPES[dtype]
    tmp = f"{output}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        tower, vision_cfg, feature_layer = _vision_tower(vision_state, d.vision, iter_dir, hf_vision, log)
        image_id, ids = _tokenizer(iter_dir, tmp, log)
        # Explicit Nones: the config classes' defaults (Llama's bos 1 / eos 2) must not pose as the real ids.
        ids = {k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        if arch == "himix" and image_id is not None:
            # Before config.json: with its remote-code auto_map there, AutoTokenizer would ask to trust it.
            _save_himix_processor(_image_processor(d.vision), tmp, iter_dir, d, jinja, log)
        elif arch == "himix":
            log("warning: without a tokenizer the export has no HiMixProcessor and no chat template")
        build = _export_himix if arch == "himix" else _export_vanilla
        tensors, config = build(d, state, tower, vision_cfg, feature_layer, tmp, image_id, ids)
        if baselines:
            tensors, config = _vanilla_baselines(tensors, config, tmp, baselines)
        # The transformers releases this export's files (remote code, config and processor layout) are tested with.
        setattr(config, TESTED_TRANSFORMERS_KEY, TESTED_TRANSFORMERS)
        config.dtype = target
        config.save_pretrained(tmp)
        tensors = {k: t.to(target) for k, t in tensors.items()}
        files = write_safetensors(tensors, tmp, max_shard_size)
        _generation_config(tmp, ids, image_id, config)
        processor = _image_processor(d.vision)
        processor.save_pretrained(tmp)
        if arch == "vanilla":
            _save_llava_processor(processor, tmp, iter_dir, d, log)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported arch={arch} ({d.language.name} + {d.vision.name}) from {iter_dir} -> {output}: "
        f"{len(tensors)} tensors in {len(files)} file(s), {str(target).replace('torch.', '')}, "
        f"vision_feature_layer={feature_layer}, image token id {image_id}"
        + (f", remote-code LlavaBaselinesForConditionalGeneration with {baselines}" if baselines else ""))
    return output


def _generation_config(out: str, ids: dict, image_id: Optional[int], config) -> None:
    """The source's generation config (copied with the tokenizer) or one from the special ids, never
    generating `<image>`: its LM-head row is untrained padding (or zero), and HiMix's forward strips it
    from every input, generated tokens included."""
    from transformers import GenerationConfig

    path = os.path.join(out, "generation_config.json")
    generation = GenerationConfig.from_pretrained(out) if os.path.isfile(path) else \
        GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    vocab = getattr(config, "text_config", config).vocab_size
    if image_id is not None and image_id < vocab:
        generation.suppress_tokens = sorted({*(generation.suppress_tokens or []), image_id})
    generation.save_pretrained(out)


PROCESSOR_CONFIG = {"processor_class": "HiMixProcessor",
                    "auto_map": {"AutoProcessor": "processing_himix.HiMixProcessor"},
                    "image_token": IMAGE_TOKEN, "padding_side": "left"}
SAMPLE_QUESTIONS, SAMPLE_ANSWERS = ("What is in the image?", "Where is it?"), ("A red circle.",)


def _system_prompt(d, log=None) -> str:
    """The system prompt training rendered: the recorded one, else (older checkpoints) the template's default."""
    from himix_megatron.data.records import DataError
    from himix_megatron.data.templates import TemplateConfig

    if d.system_prompt is None and log is not None:
        log(f"warning: the checkpoint records no system prompt (an earlier release); the export assumes the "
            f"{d.template} template's default")
    try:
        return TemplateConfig(d.template, system=d.system_prompt).system_prompt
    except DataError as e:
        raise ConversionError(f"the checkpoint's himix.json: {e}") from None


def _save_himix_processor(image_processor, out: str, iter_dir: str, d, jinja: str, log) -> None:
    """processor_config.json (AutoProcessor -> the remote-code HiMixProcessor) and chat_template.jinja, after
    checking that the template and the processor give the training prompt's ids (refused if they do not)."""
    from transformers import AutoTokenizer

    from himix_megatron.hf.processing_himix import HiMixProcessor

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    processor = HiMixProcessor(image_processor, tok, chat_template=jinja)
    _check_prompts(processor, os.path.join(iter_dir, "tokenizer"), d.template, _system_prompt(d), log)
    with open(os.path.join(out, "processor_config.json"), "w", encoding="utf-8") as f:
        json.dump(PROCESSOR_CONFIG, f, indent=2, sort_keys=True)
    # Ours replaces the LM's own template (copied with the tokenizer). The processor reads a legacy
    # chat_template.json before chat_template.jinja; the tokenizer reads chat_template.jinja before the
    # `chat_template` of tokenizer_config.json.
    with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(jinja)
    if os.path.isfile(os.path.join(out, "chat_template.json")):
        os.remove(os.path.join(out, "chat_template.json"))


def _training_tokenizer(tokenizer_dir: str, log):
    """The training data pipeline's tokenizer of the checkpoint, or None (logged) when it cannot load one."""
    from himix_megatron.data.records import DataError
    from himix_megatron.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(tokenizer_dir)
    except DataError as e:  # a checkpoint imported but not trained: no training tokenizer to compare with
        log(f"warning: the training data pipeline cannot load the checkpoint's tokenizer ({e}); the chat "
            "template is written unchecked")
        return None


def _prompt_mismatch(processor, encode: Callable[[str], list], tok, template: str, system: str, arch: str,
                     expand: Callable[[list], list] = lambda ids: ids) -> Optional[str]:
    """None when the chat template + `encode` (the processor's tokenization of the rendered text) give
    generation_prompt's ids (training's tokenizer; `expand` maps them to the processor's image tokens) for a
    one-question prompt with an image and a two-round one: with no system message (the recorded prompt, what
    harnesses send), and with a system message stating another prompt and an empty one; else what differs."""
    from himix_megatron.data.templates import TemplateConfig, generation_prompt

    systems = [None] if template == "pretrain" else [None, "Answer in one word.", ""]
    for n, stated in itertools.product((1,) if template == "pretrain" else (1, 2), systems):
        cfg = TemplateConfig.for_arch(template, arch, system=system if stated is None else stated)
        questions, answers = SAMPLE_QUESTIONS[:n], SAMPLE_ANSWERS[:n - 1]
        messages = [] if stated is None else [{"role": "system", "content": stated}]
        for i, q in enumerate(questions):
            messages.append({"role": "user", "content": [{"type": "image"}] * (i == 0) + [{"type": "text", "text": q}]})
            if i < len(answers):
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[i]}]})
        try:
            expected = expand(generation_prompt(questions, answers, tok, cfg, has_image=True))
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - DataError (no BOS/EOS), the template's raise_exception (jinja2)
            raise ConversionError(f"the {template} chat template cannot render a sample conversation: {e}") from e
        ids = list(encode(text))
        if text.count(IMAGE_TOKEN) != 1 or ids != expected:
            return (f"the {template} chat template does not reproduce the training prompt with this tokenizer "
                    f"({n} round(s), system message {stated!r}): {text!r} gives {ids}, training {expected}")
    return None


def _check_prompts(processor, tokenizer_dir: str, template: str, system: str, log) -> None:
    """HiMix: the chat template + HiMixProcessor give training's prompt ids (`_prompt_mismatch`), else refused."""
    tok = _training_tokenizer(tokenizer_dir, log)
    problem = tok and _prompt_mismatch(processor, processor.encode_text, tok, template, system, "himix")
    if problem:
        raise ConversionError(problem)


def _vanilla_chat_template(processor, iter_dir: str, d, log) -> Optional[str]:
    """The vanilla export's chat template: the training template with the recorded system prompt, checked (as
    HiMix's) through LlavaProcessor, which expands `<image>` to the N image tokens and tokenizes the whole
    string. Training tokenized the text after `<image>` as a piece of its own (the reference's
    `tokenizer_image_token`), so a sentencepiece tokenizer gave it its dummy-prefix "▁"; a whole-string
    tokenization adds none after an added token when the tokenizer has legacy=False. The template then writes that
    space itself (`<image> \\n{question}`), which gives exactly training's ids; a tokenizer that neither rendering
    serves is refused. None (no template) for a checkpoint that records none."""
    from PIL import Image

    if d.template is None:
        log("warning: the checkpoint records no conversation template; the vanilla export ships no chat template "
            "(lmms-eval's llava_hf then needs --force_simple)")
        return None
    system = _system_prompt(d, log)
    tok = _training_tokenizer(os.path.join(iter_dir, "tokenizer"), log)
    if tok is None:
        return chat_template(d.template, system)
    image = Image.new("RGB", (d.vision.image_size, d.vision.image_size))
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    expand = lambda ids: [t for i in ids for t in ([image_id] * d.vision.num_features if i < 0 else [i])]  # noqa: E731
    encode = lambda text: processor(text=text, images=[image])["input_ids"][0]  # noqa: E731
    problems = []
    for after_image in ("", " "):
        processor.chat_template = chat_template(d.template, system, after_image)
        problem = _prompt_mismatch(processor, encode, tok, d.template, system, "vanilla", expand)
        if problem is None:
            return processor.chat_template
        problems.append(problem)
    raise ConversionError(f"the vanilla export's LlavaProcessor tokenizes the prompt differently from training, with "
                          f"`<image>\\n` and with `<image> \\n`: {problems[0]}")


def _save_llava_processor(image_processor, out: str, iter_dir: str, d, log) -> None:
    """The LlavaProcessor, with chat_template.jinja reproducing the training prompt (`_vanilla_chat_template`)."""
    from transformers import AutoTokenizer, LlavaProcessor, PreTrainedTokenizerFast

    # tokenizer.json through the generic tokenizers backend, which is what transformers loads for a LLaVA
    # directory; saved under that class, a baselines (remote-code) directory loads it too, where the tokenizer
    # config's model class would otherwise be chosen (transformers 5's LlamaTokenizer adds no dummy prefix
    # after a special token, even with legacy=True, so `<image>\n` would lose training's "▁").
    read = PreTrainedTokenizerFast if os.path.isfile(os.path.join(out, "tokenizer.json")) else AutoTokenizer
    tok = read.from_pretrained(out, local_files_only=True)
    v = d.vision
    # (image_size / patch)^2 patches, plus CLIP's class token, minus the first token ("default" strategy):
    # SigLIP loses its first patch, CLIP its class token.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=v.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=int(v.class_token),
                               image_token=IMAGE_TOKEN)
    processor.chat_template = _vanilla_chat_template(processor, iter_dir, d, log)
    for name in ("chat_template.json", "chat_template.jinja"):  # the source LM's, copied with the tokenizer
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    processor.save_pretrained(out)
    # transformers 5 nests the image processor in processor_config.json; transformers 4 (which most eval
    # harnesses pin) reads it from preprocessor_config.json and passes every processor_config.json key to
    # the processor's constructor. The flat form plus preprocessor_config.json serves both.
    path = os.path.join(out, "processor_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.pop("image_processor", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
