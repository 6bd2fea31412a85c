"""Import of checkpoints written by the authors' reference code (Xuange923/HiMix, TinyLLaVA layouts).

Tiny random models are written here in both reference layouts with the reference's tensor names: a
transformers Llama/Qwen2 state dict plus per-layer `input_layernorm_img` / `self_attn.{k,v}_proj_img`
(biases for Qwen2), and a SiglipVisionModel. Our megatron model's logits after the import equal a forward of
the reference math written out below over the *reference* names (so it shares no name mapping with the
code under test), on vision features computed by transformers' SigLIP as the reference selects them.
"""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, \
    SiglipVisionModel

from himix_megatron.config import ConfigError, ParallelConfig
from himix_megatron.convert.layout import ConversionError
from model_utils import randomize_hf
from tokenizer_utils import save_word_level_tokenizer

D_V = 48
SIGLIP = dict(hidden_size=D_V, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
# The text configs as transformers 4.44 (the reference's pin) writes them.
LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=300, rms_norm_eps=1e-5,
             rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False, max_position_embeddings=2048,
             hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
             pretraining_tp=1, torch_dtype="bfloat16", transformers_version="4.44.0", **SHAPE)
QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=200, rms_norm_eps=1e-6,
             rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=4096, hidden_act="silu",
             use_sliding_window=False, sliding_window=4096, max_window_layers=28, transformers_version="4.44.0",
             **SHAPE)
# Fields transformers 4.44 drops from a TinyLLaVA config's text_config when they equal LlamaConfig()'s.
LLAMA_DIFF_DROPS = ("hidden_act", "max_position_embeddings", "rope_scaling", "attention_bias", "mlp_bias",
                    "tie_word_embeddings", "pretraining_tp")




def _lm(cfg, seed):
    """(transformers model, reference LM state dict: the model's tensors + random HiMix tensors per layer)."""
    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")}
    cls, config_cls = (Qwen2ForCausalLM, Qwen2Config) if cfg["model_type"] == "qwen2" else (LlamaForCausalLM,
                                                                                             LlamaConfig)
    model = randomize_hf(cls(config_cls(**fields)), seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # clone: no tied storage left behind
    if cfg["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)  # named_parameters() and safetensors saves keep one of the pair
    g = torch.Generator().manual_seed(seed + 100)
    kv = cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm_img.weight"] = 1 + 0.1 * torch.randn(D_V, generator=g)
        for x in "kv":
            state[f"{p}self_attn.{x}_proj_img.weight"] = 0.1 * torch.randn(kv, D_V, generator=g)
            if cfg["model_type"] == "qwen2":
                state[f"{p}self_attn.{x}_proj_img.bias"] = 0.1 * torch.randn(kv, generator=g)
    return model, state


def _dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _save_weights(tensors, directory, fmt):
    from himix_megatron.convert.hf_files import write_safetensors

    os.makedirs(directory, exist_ok=True)
    if fmt == "bin":
        torch.save(tensors, os.path.join(directory, "pytorch_model.bin"))
    else:  # sharded safetensors with an index, as save_pretrained writes large models
        write_safetensors(tensors, str(directory), max_shard_size="60KB")


def write_reference(root, kind, fmt, lm_cfg, lm_state, vision_state, *, drop=(), extra=None, top=None):
    """A reference checkpoint directory in the `kind` layout ("pretrain" / "finetune"), `fmt` "bin" or
    "safetensors"; `drop`: LM tensor names to leave out; `extra`: more tensors (full names) to add."""
    root = str(root)
    os.makedirs(root)
    lm_state = {k: v for k, v in lm_state.items() if k not in drop}
    text_config = {**lm_cfg, "vision_hidden_size": D_V}
    vision_config = {"model_type": "siglip_vision_model", **SIGLIP}
    top_config = {"model_type": "tinyllava", "architectures": ["TinyLlavaForConditionalGeneration"],
                  "llm_model_name_or_path": "/weights/tiny-llm", "vision_model_name_or_path": "/weights/tiny-siglip",
                  "vision_feature_layer": -2, "vision_feature_select_strategy": "patch", "tokenizer_padding_side":
                  "right", "use_cache": True, "transformers_version": "4.44.0",
                  "text_config": {k: v for k, v in text_config.items()
                                  if not (k in LLAMA_DIFF_DROPS and lm_cfg["model_type"] == "llama")},
                  "vision_config": vision_config, **(top or {})}
    _dump(top_config, os.path.join(root, "config.json"))
    save_word_level_tokenizer(root, lm_cfg["vocab_size"])
    if kind == "pretrain":
        _save_weights({**lm_state, **(extra or {})}, os.path.join(root, "language_model"), fmt)
        _dump(text_config, os.path.join(root, "language_model", "config.json"))
        _save_weights({"vision_model." + k: v for k, v in vision_state.items()}, os.path.join(root, "vision_tower"),
                      fmt)
        _dump(vision_config, os.path.join(root, "vision_tower", "config.json"))
    else:
        tensors = {"language_model." + k: v for k, v in lm_state.items()}
        tensors.update({"vision_tower._vision_tower.vision_model." + k: v for k, v in vision_state.items()})
        _save_weights({**tensors, **(extra or {})}, root, fmt)
    return root


# --- the reference math, written out over the reference's names ---------------------------------------


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    """x [M, heads, hd] at positions 0..M-1 (rotate-half, as apply_rotary_pos_emb)."""
    m, _, hd = x.shape
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(m, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(sd, cfg, tokens, features):
    """HiMix as modeling_llama.py / modeling_qwen2.py compute it (eager path); features [b, N, d_v] or None."""
    heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = cfg["hidden_size"] // heads, cfg["rms_norm_eps"]

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    out = []
    for b in range(tokens.shape[0]):
        h = sd["model.embed_tokens.weight"][tokens[b]]
        m = h.shape[0]
        n = 0 if features is None else features.shape[1]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = _rms(h, sd[p + "input_layernorm.weight"], eps)
            q = _rope(lin(x, p + "self_attn.q_proj").view(m, heads, hd), cfg["rope_theta"])
            k = _rope(lin(x, p + "self_attn.k_proj").view(m, groups, hd), cfg["rope_theta"])
            v = lin(x, p + "self_attn.v_proj").view(m, groups, hd)
            if n:  # the same raw features in every layer, normed by this layer's RMSNorm_v; no RoPE
                xv = _rms(features[b], sd[p + "input_layernorm_img.weight"], eps)
                k = torch.cat([lin(xv, p + "self_attn.k_proj_img").view(n, groups, hd), k])
                v = torch.cat([lin(xv, p + "self_attn.v_proj_img").view(n, groups, hd), v])
            k, v = k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1)
            scores = torch.einsum("mhd,khd->hmk", q, k) / hd ** 0.5
            visible = torch.cat([torch.ones(m, n, dtype=torch.bool), torch.ones(m, m, dtype=torch.bool).tril()], 1)
            attn = torch.einsum("hmk,khd->mhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
            h = h + lin(attn.reshape(m, heads * hd), p + "self_attn.o_proj")
            x = _rms(h, sd[p + "post_attention_layernorm.weight"], eps)
            h = h + lin(F.silu(lin(x, p + "mlp.gate_proj")) * lin(x, p + "mlp.up_proj"), p + "mlp.down_proj")
        h = _rms(h, sd["model.norm.weight"], eps)
        out.append(h @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T)
    return torch.stack(out)


def reference_features(siglip, pixels):
    """The reference's image features: SigLIP hidden_states[-2], first patch dropped (vision_tower/base.py)."""
    with torch.no_grad():
        return siglip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    siglip = randomize_hf(SiglipVisionModel(SiglipVisionConfig(**SIGLIP)), 3)
    llama, llama_sd = _lm(LLAMA, 1)
    qwen, qwen_sd = _lm(QWEN2, 2)
    return {"siglip": (siglip, {k: v.clone() for k, v in siglip.state_dict().items()}),
            "llama": (llama, llama_sd, LLAMA), "qwen2": (qwen, qwen_sd, QWEN2)}


VARIANTS = {  # name: (LM, layout, format)
    "llama-pretrain-bin": ("llama", "pretrain", "bin"),
    "llama-finetune-safetensors": ("llama", "finetune", "safetensors"),
    "qwen2-pretrain-safetensors": ("qwen2", "pretrain", "safetensors"),
    "qwen2-finetune-bin": ("qwen2", "finetune", "bin"),
}


@pytest.fixture(scope="module")
def refs(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    vision_sd = models["siglip"][1]
    return {name: write_reference(root / name, kind, fmt, models[lm][2], models[lm][1], vision_sd)
            for name, (lm, kind, fmt) in VARIANTS.items()}


def _inputs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 7), generator=g), torch.randn(2, 3, 56, 56, generator=g)


def _expected(models, lm, tokens, pixels):
    return reference_logits(models[lm][1], models[lm][2], tokens, reference_features(models["siglip"][0], pixels))


def _ours(chunks, encoder, tokens, pixels, vocab):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        features = encoder(pixels)
        return chunks[0].eval()(tokens, positions, features)[..., :vocab], features


def test_the_hand_written_reference_forward_is_transformers_without_an_image(models):
    """The forward above, with no image, is transformers' Llama / Qwen2: its text path is right."""
    for lm in ("llama", "qwen2"):
        model, sd, cfg = models[lm]
        tokens, _ = _inputs(cfg["vocab_size"])
        with torch.no_grad():
            expected = model(tokens).logits
        torch.testing.assert_close(reference_logits(sd, cfg, tokens, None), expected, atol=1e-5, rtol=0)


# --- in process, TP = PP = 1 --------------------------------------------------------------------------


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_weights_give_the_reference_logits(models, refs, variant):
    from himix_megatron.checkpoint import build_model
    from himix_megatron.convert.reference_import import fill_from_reference, open_tensors, plan_reference

    lm, kind, _ = VARIANTS[variant]
    plan = plan_reference(refs[variant], ParallelConfig(), template="qwen2_base" if lm == "qwen2" else "tinyllama")
    d = plan.description
    assert plan.reference.kind == kind and d.arch == "himix"
    assert (d.language.qkv_bias, d.language.tie_embeddings) == ((True, True) if lm == "qwen2" else (False, False))
    # Fields a 4.44 TinyLLaVA text_config drops (finetune) come back as 4.44's defaults, not ours.
    assert d.language.max_position_embeddings == models[lm][2]["max_position_embeddings"]
    assert d.language.rotary_base == models[lm][2]["rope_theta"] and d.language.norm_epsilon == models[lm][2][
        "rms_norm_eps"]
    assert d.vision.hidden_size == D_V and d.vision.num_layers == 2
    chunks, encoder = build_model(d, ParallelConfig())
    lm_tensors, vision = open_tensors(plan.reference, d.language)
    missing, unused = fill_from_reference(chunks, encoder, d, lm_tensors, vision)
    assert missing == []  # every parameter from the reference, none newly initialised
    assert any("encoder.layers.1." in k for k in unused) and any("post_layernorm" in k for k in unused)
    tokens, pixels = _inputs(models[lm][2]["vocab_size"])
    ours, features = _ours(chunks, encoder, tokens, pixels, models[lm][2]["vocab_size"])
    torch.testing.assert_close(features.transpose(0, 1), reference_features(models["siglip"][0], pixels),
                               atol=1e-5, rtol=0)
    expected = _expected(models, lm, tokens, pixels)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    text_only = reference_logits(models[lm][1], models[lm][2], tokens, None)
    assert (expected - text_only).abs().max() > 1e-2  # the image (and so the HiMix tensors) mattered


# --- the real import: TP x PP processes writing a checkpoint ------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("variant,parallel", [
    ("llama-pretrain-bin", ParallelConfig(tensor_model_parallel_size=2)),
    ("qwen2-finetune-bin", ParallelConfig(pipeline_model_parallel_size=2)),
])
def test_import_writes_a_checkpoint_with_the_reference_logits(models, refs, tmp_path, variant, parallel):
    from himix_megatron.checkpoint import read_description
    from himix_megatron.convert.hf_export import load_tp1
    from himix_megatron.convert.reference_import import import_reference

    lm = VARIANTS[variant][0]
    ckpt = str(tmp_path / "ckpt")
    logs = []
    report = import_reference(refs[variant], parallel, ckpt, template="tinyllama", log=logs.append)
    assert report.new_parameters == [] and "none newly initialised" in " ".join(logs)
    assert read_description(ckpt).template == "tinyllama"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(os.path.join(ckpt, "iter_0000000",
                                                                                      "tokenizer")))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left
    _, _, chunks, encoder, _ = load_tp1(ckpt)
    tokens, pixels = _inputs(models[lm][2]["vocab_size"], seed=1)
    ours, _ = _ours(chunks, encoder, tokens, pixels, models[lm][2]["vocab_size"])
    torch.testing.assert_close(ours, _expected(models, lm, tokens, pixels), atol=1e-4, rtol=0)


# --- errors --------------------------------------------------------------------------------------------


def _plan(directory):
    from himix_megatron.convert.reference_import import plan_reference

    return plan_reference(str(directory), ParallelConfig())


@pytest.mark.parametrize("kind,fmt,where", [
    ("pretrain", "bin", r"language_model/pytorch_model\.bin"),
    ("finetune", "safetensors", r"model\.safetensors\.index\.json"),
])
def test_a_missing_vision_key_projection_names_the_layer_and_the_file(models, tmp_path, kind, fmt, where):
    _, sd, cfg = models["llama"]
    prefix = "" if kind == "pretrain" else "language_model."
    ref = write_reference(tmp_path / "ref", kind, fmt, cfg, sd, models["siglip"][1],
                          drop=["model.layers.2.self_attn.k_proj_img.weight"])
    with pytest.raises(ConversionError, match=rf"{where}: layer 2 has no '{prefix}model\.layers\.2\.self_attn\."
                                              r"k_proj_img\.weight' \(HiMix's vision key projection\)"):
        _plan(ref)


def test_a_missing_qwen2_vision_bias_is_named(models, tmp_path):
    _, sd, cfg = models["qwen2"]
    ref = write_reference(tmp_path / "ref", "finetune", "bin", cfg, sd, models["siglip"][1],
                          drop=["model.layers.0.self_attn.v_proj_img.bias"])
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin: layer 0 has no 'language_model\.model\.layers\.0"
                                              r"\.self_attn\.v_proj_img\.bias'.*\(\+ \.bias for Qwen2\)"):
        _plan(ref)


def test_directories_in_neither_layout_are_refused(models, refs, tmp_path):
    neither = "not a HiMix reference checkpoint in either layout"
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConversionError, match=rf"empty: {neither}.*found neither"):
        _plan(tmp_path / "empty")
    half = tmp_path / "half"
    shutil.copytree(os.path.join(refs["llama-pretrain-bin"], "language_model"), half / "language_model")
    with pytest.raises(ConversionError, match=rf"half: {neither}.*found language_model/ only"):
        _plan(half)
    plain = tmp_path / "plain-llama"  # an ordinary HF model directory
    models["llama"][0].save_pretrained(plain)
    with pytest.raises(ConversionError, match=rf"{neither}.*top-level weights without a language_model\. prefix"):
        _plan(plain)
    with pytest.raises(ConversionError, match="no such directory"):
        _plan(tmp_path / "missing")


def test_a_checkpoint_without_himix_tensors_is_not_himix(models, tmp_path):
    _, sd, cfg = models["llama"]
    ref = write_reference(tmp_path / "ref", "pretrain", "bin", cfg, sd, models["siglip"][1],
                          drop=[k for k in sd if "_img" in k])
    with pytest.raises(ConversionError, match="no HiMix tensors .* in any decoder layer: not a HiMix checkpoint"):
        _plan(ref)


@pytest.mark.parametrize("case,match", [
    ("feature-layer", r"config\.json: vision_feature_layer=-1: the reference fed the LM SigLIP hidden_states\[-1\]"),
    ("cls-patch", r"vision_feature_select_strategy='cls_patch'"),
    ("qwen2-rope-scaling", r"rope_scaling=.*the reference Qwen2 attention ignores it"),
    ("connector",
     r"tensor\(s\) outside language_model\.\* and vision_tower\._vision_tower\.\*.*'connector\._connector"),
    ("llama-vision-bias", r"language model tensor\(s\) that a HiMix Llama decoder does not have.*k_proj_img\.bias"),
    ("lora", r"a LoRA adapter \(adapter_config\.json\); merge it"),
])
def test_what_our_model_would_compute_differently_is_refused(models, tmp_path, case, match):
    lm = "qwen2" if case == "qwen2-rope-scaling" else "llama"
    _, sd, cfg = models[lm]
    top, extra = None, None
    if case == "feature-layer":
        top = {"vision_feature_layer": -1}  # the reference CLI's default for mm_vision_select_layer
    elif case == "cls-patch":
        top = {"vision_feature_select_strategy": "cls_patch"}
    elif case == "qwen2-rope-scaling":
        cfg = {**cfg, "rope_scaling": {"type": "linear", "factor": 2.0}}
    elif case == "connector":
        extra = {"connector._connector.0.weight": torch.zeros(64, D_V)}
    elif case == "llama-vision-bias":
        extra = {"language_model.model.layers.1.self_attn.k_proj_img.bias": torch.zeros(32)}
    ref = write_reference(tmp_path / "ref", "finetune", "bin", cfg, sd, models["siglip"][1], top=top, extra=extra)
    if case == "lora":
        _dump({"peft_type": "LORA"}, os.path.join(ref, "adapter_config.json"))
    with pytest.raises(ConversionError, match=match):
        _plan(ref)


def test_cli_runs_it_and_reports_errors_without_a_traceback(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(os.path.dirname(__file__), "..", "tools", "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    os.makedirs(tmp_path / "empty")
    code = cli.main(["import-reference", "--reference", str(tmp_path / "empty"), "--tensor-model-parallel-size", "2",
                     "--output", str(tmp_path / "out")])
    assert code == 1 and "not a HiMix reference checkpoint in either layout" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_a_pretrain_layout_without_the_tinyllava_config_imports_with_a_warning(models, tmp_path):
    _, sd, cfg = models["llama"]
    ref = write_reference(tmp_path / "ref", "pretrain", "safetensors", cfg, sd, models["siglip"][1])
    os.remove(os.path.join(ref, "config.json"))
    plan = _plan(ref)
    assert plan.reference.kind == "pretrain" and plan.reference.tokenizer_dir == ref
    assert len(plan.warnings) == 1 and "vision_feature_layer" in plan.warnings[0]
    assert plan.description.language.vocab_size == 300


@pytest.mark.parametrize("lm,template", [("llama", "tinyllama"), ("qwen2", "qwen2_base")])
def test_the_import_records_the_authors_template_and_prompt(models, tmp_path, lm, template):
    """The reference records no --conv_version: the import takes the authors' template for the decoder family."""
    from himix_megatron.data.templates import REFERENCE_SYSTEM

    _, sd, cfg = models[lm]
    d = _plan(write_reference(tmp_path / "ref", "pretrain", "bin", cfg, sd, models["siglip"][1])).description
    assert (d.template, d.system_prompt) == (template, REFERENCE_SYSTEM)
    with pytest.raises(ConfigError, match="unknown conversation template 'alpaca'"):
        from himix_megatron.convert.reference_import import plan_reference

        plan_reference(str(tmp_path / "ref"), ParallelConfig(), template="alpaca")


def test_tied_embeddings_that_differ_are_refused(models, tmp_path):
    """Qwen2 ties its embeddings; a save holding both matrices must hold one matrix twice, or one would be lost."""
    _, sd, cfg = models["qwen2"]
    embed = sd["model.embed_tokens.weight"]
    same = write_reference(tmp_path / "same", "pretrain", "bin", cfg, sd, models["siglip"][1],
                           extra={"lm_head.weight": embed.clone()})
    assert _plan(same).description.language.tie_embeddings
    differs = write_reference(tmp_path / "differs", "pretrain", "bin", cfg, sd, models["siglip"][1],
                              extra={"lm_head.weight": embed + 1})
    with pytest.raises(ConversionError, match=r"ties the embeddings, but 'lm_head\.weight' differs from "
                                              r"'model\.embed_tokens\.weight'"):
        _plan(differs)
