"""Checkpoint conversion, Hugging Face <-> megatron, on tiny random models built here with transformers.

Logits of our megatron models equal transformers' (text-only Llama/Qwen2 at TP=2; HiMix with an image
against the exported remote-code model; vanilla against LlavaForConditionalGeneration), and
import -> export at TP=2 and at PP=2 gives back every HF tensor bit for bit.
"""

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, \
    SiglipVisionModel

from himix_megatron.config import ParallelConfig
from himix_megatron.convert.layout import ConversionError
from himix_megatron.data.templates import IMAGE_TOKEN_INDEX
from himix_megatron.hf import TESTED_TRANSFORMERS, TESTED_TRANSFORMERS_KEY
from model_utils import randomize_hf, set_model_field
from multiprocess import run_world
from tokenizer_utils import save_word_level_tokenizer

TP2 = ParallelConfig(tensor_model_parallel_size=2)
PP2 = ParallelConfig(pipeline_model_parallel_size=2)
LM_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)


def _save(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    return str(directory)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny HF checkpoints: Llama (vocab 300: padded to 384 at TP=1, 512 at TP=2; untied; Llama-3 RoPE
    scaling), Qwen2 (vocab 200, tied, qkv bias), SigLIP (d_v 48, 2 layers, 56 px, 14 px patches)."""
    root = tmp_path_factory.mktemp("hf")
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        **LM_SHAPE))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=200, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                                        **LM_SHAPE))
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, image_size=56, patch_size=14))
    dirs = {}
    for name, model, seed in (("llama", llama, 1), ("qwen2", qwen, 2), ("siglip", siglip, 3)):
        dirs[name] = _save(randomize_hf(model, seed), root / name)
    save_word_level_tokenizer(dirs["llama"], 300)  # as large as the model's vocabulary: LLaVA's <image> must grow it
    save_word_level_tokenizer(dirs["qwen2"], 180)  # smaller (like Qwen2's 151646 < 151936): <image> takes a free row
    return dirs


def _text_batch(vocab, seed=0, batch=2, length=7):
    """Random text below the tokenizers' sizes, so it never holds the exports' <image> token."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, min(vocab, 170), (batch, length), generator=g)
    return tokens, torch.arange(length).expand(batch, length)


def _hf_logits(directory, cls, tokens):
    model = cls.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(tokens).logits


# --- 1. text only, TP=2 -----------------------------------------------------------------------------


def _text_logits_tp2(hf_dirs, names):
    from megatron.core import tensor_parallel

    from himix_megatron.checkpoint import build_model
    from himix_megatron.convert.hf_files import HFTensors
    from himix_megatron.convert.hf_import import fill_from_hf, plan_import

    out = {}
    for name in names:
        plan = plan_import(hf_dirs[name], hf_dirs["siglip"], "himix", TP2)
        chunks, encoder = build_model(plan.description, TP2)
        fill_from_hf(chunks, encoder, plan.description, HFTensors(hf_dirs[name]), HFTensors(hf_dirs["siglip"]))
        tokens, positions = _text_batch(plan.description.language.vocab_size)
        with torch.no_grad():
            logits = chunks[0](tokens, positions, None)  # N = 0: no vision keys
        out[name] = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return out


@pytest.mark.slow
def test_text_only_logits_match_transformers_at_tp2(hf):
    results = run_world(2, TP2, _text_logits_tp2, hf, ["llama", "qwen2"])
    for name, cls, vocab in (("llama", LlamaForCausalLM, 300), ("qwen2", Qwen2ForCausalLM, 200)):
        expected = _hf_logits(hf[name], cls, _text_batch(vocab)[0])
        for rank_result in results:
            ours = rank_result[name]
            assert ours.shape[-1] == (512 if name == "llama" else 256)  # padded vocabulary
            assert ours[..., vocab:].abs().max() == 0  # padding rows are zero
            torch.testing.assert_close(ours[..., :vocab], expected, atol=1e-4, rtol=0, msg=name)


# --- 2-4. import -> export, and the exported models against ours --------------------------------------


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    """(checkpoint, export) directories: Llama HiMix at TP=2, Qwen2 HiMix at PP=2, Llama vanilla at TP=2."""
    from himix_megatron.convert.hf_export import export_checkpoint
    from himix_megatron.convert.hf_import import import_checkpoint

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for key, lm, arch, parallel in (("llama-himix-tp2", "llama", "himix", TP2),
                                    ("qwen2-himix-pp2", "qwen2", "himix", PP2),
                                    ("llama-vanilla-tp2", "llama", "vanilla", TP2)):
        ckpt, exported = str(root / f"{key}-ckpt"), str(root / f"{key}-hf")
        report = import_checkpoint(hf[lm], hf["siglip"], arch, parallel, ckpt, template="tinyllama", log=lambda _: None)
        export_checkpoint(ckpt, exported, max_shard_size="100KB", log=lambda _: None)
        out[key] = (ckpt, exported, report)
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("key,lm", [("llama-himix-tp2", "llama"), ("qwen2-himix-pp2", "qwen2")])
def test_import_export_round_trip_is_bit_identical(hf, converted, key, lm):
    from himix_megatron.convert.hf_files import HFTensors
    from himix_megatron.convert.layout import init_new_parameter, split_kv
    from himix_megatron.checkpoint import read_description

    ckpt, exported, report = converted[key]
    out = HFTensors(exported)
    assert len(json.load(open(os.path.join(exported, "model.safetensors.index.json")))["weight_map"]) == len(out)
    assert len({out._file_of[k] for k in out}) > 1  # really sharded
    source, vision = HFTensors(hf[lm]), HFTensors(hf["siglip"])
    for name in source:
        assert torch.equal(out[name], source[name]), name
    for name in vision:  # the whole SigLIP tower, including the layer, norm and head our encoder skips
        assert torch.equal(out["vision_tower.vision_model." + name], vision[name]), name
    himix = sorted(set(out) - set(source) - {"vision_tower.vision_model." + k for k in vision})
    parts = ["vision_norm.weight", "vision_k_proj.weight", "vision_v_proj.weight"]
    if lm == "qwen2":
        parts += ["vision_k_proj.bias", "vision_v_proj.bias"]
    assert himix == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in parts)
    assert "lm_head.weight" not in out if lm == "qwen2" else "lm_head.weight" in out  # tied / untied
    # The new parameters were reported, initialised by DESIGN section 1 and independent of the layout.
    assert len(report.new_parameters) == 4 * (3 if lm == "qwen2" else 2)
    name = "decoder.layers.2.self_attention.linear_kv_vision.weight"
    k, v = split_kv(init_new_parameter(name, (64, 48), 0.02, seed=0), read_description(ckpt).language)
    assert torch.equal(out["model.layers.2.self_attn.vision_k_proj.weight"], k)
    assert torch.equal(out["model.layers.2.self_attn.vision_v_proj.weight"], v)
    assert 0.015 < k.std() < 0.025
    assert torch.equal(out["model.layers.2.self_attn.vision_norm.weight"], torch.ones(48))
    tokenizer = os.path.join(ckpt, "iter_0000000", "tokenizer")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tokenizer))
    assert {"preprocessor_config.json", "configuration_himix.py", "modeling_himix.py", "tokenizer.json"} <= \
        set(os.listdir(exported))
    assert read_description(ckpt).template == "tinyllama"
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config[TESTED_TRANSFORMERS_KEY] == TESTED_TRANSFORMERS  # the transformers range this export is tested with


def _megatron_logits(ckpt, tokens, pixels):
    """Logits of our model loaded from `ckpt` (at TP=1 in this process) for text `tokens` and an image."""
    from himix_megatron.convert.hf_export import load_tp1

    description, _, chunks, encoder, _ = load_tp1(ckpt)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        features = encoder(pixels)
        return chunks[0].eval()(tokens, positions, features)[..., :description.language.vocab_size]


@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("key,vocab", [("llama-himix-tp2", 300), ("qwen2-himix-pp2", 200)])
def test_himix_logits_with_image_match_the_exported_remote_code_model(converted, key, vocab):
    from transformers import AutoModelForCausalLM

    ckpt, exported, _ = converted[key]
    tokens, _ = _text_batch(vocab, seed=5)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    ours = _megatron_logits(ckpt, tokens, pixels)
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    with torch.no_grad():
        theirs = model(input_ids=tokens, pixel_values=pixels).logits
        text_only = model(input_ids=tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (theirs - text_only).abs().max() > 1e-3  # the image really changed the logits
    # The export generates, its first greedy token is ours, and it never generates <image> (Qwen2's id 180
    # is a row of the LM head, so generation_config.json suppresses it).
    image_id = model.config.image_token_index
    assert model.generation_config.suppress_tokens == ([image_id] if image_id < vocab else None)
    generated = model.generate(input_ids=tokens, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, tokens.shape[1] + 3)
    assert torch.equal(generated[:, tokens.shape[1]], ours[:, -1].argmax(-1))


@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
def test_vanilla_export_matches_transformers_llava(hf, converted):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ckpt, exported, report = converted["llama-vanilla-tp2"]
    assert [n for n in report.new_parameters] == [f"vision_projection.encoder.linear_fc{i}.{k}"
                                                  for i in (1, 2) for k in ("bias", "weight")]
    config = json.load(open(os.path.join(exported, "config.json")))
    image_id = config["image_token_index"]
    assert image_id == 300 and config["text_config"]["vocab_size"] == 301  # <image> grew the vocabulary
    assert config["vision_feature_select_strategy"] == "default" and config["projector_hidden_act"] == "gelu"
    assert config[TESTED_TRANSFORMERS_KEY] == TESTED_TRANSFORMERS
    generation = json.load(open(os.path.join(exported, "generation_config.json")))
    assert generation["suppress_tokens"] == [image_id] and generation["eos_token_id"] == 2
    model, info = LlavaForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info
    tokens, _ = _text_batch(300, seed=7)
    tokens[:, 3] = IMAGE_TOKEN_INDEX  # training's ids: the image where the template put it
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(8))
    ours = _megatron_logits(ckpt, tokens, pixels)
    n = 15  # (56 / 14)^2 patches, the first dropped
    ids = torch.cat([tokens[:, :3], torch.full((2, n), image_id), tokens[:, 4:]], dim=1)
    at = [t + (n - 1) * (t >= 3) for t in range(tokens.shape[1])]  # the image id's output: the last image token's
    with torch.no_grad():
        theirs = model.eval()(input_ids=ids, pixel_values=pixels).logits[:, at, :300]
        other_image = model(input_ids=ids, pixel_values=-pixels).logits[:, at, :300]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (theirs - other_image).abs().max() > 1e-3  # the image really reached the text
    # The processor expands one <image> into exactly the features the model produces, and preprocesses
    # images as our data pipeline does.
    import numpy as np
    from PIL import Image

    from himix_megatron.data.image import ImageConfig, preprocess

    processor = AutoProcessor.from_pretrained(exported)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    batch = processor(images=image, text="<image> w5 w6", return_tensors="pt")
    assert int((batch["input_ids"] == image_id).sum()) == n
    expected = torch.from_numpy(preprocess(image, ImageConfig(size=56)))
    torch.testing.assert_close(batch["pixel_values"][0], expected, atol=1e-6, rtol=0)


# --- 5. export: the SigLIP tower without the import's extras, and bad input ---------------------------


def _copy_checkpoint(converted, tmp_path, edit=None):
    import shutil

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(converted["llama-himix-tp2"][0], ckpt)
    iter_dir = os.path.join(ckpt, "iter_0000000")
    if edit:
        edit(iter_dir)
    return ckpt, iter_dir


@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
def test_export_without_the_vision_extras(hf, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    from himix_megatron.convert.hf_export import export_checkpoint
    from himix_megatron.convert.hf_files import HFTensors
    from himix_megatron.convert.hf_import import VISION_EXTRA

    def drop_extras(iter_dir):  # a checkpoint saved without them (the manifest agrees)
        os.remove(os.path.join(iter_dir, VISION_EXTRA))
        manifest = json.load(open(os.path.join(iter_dir, "manifest.json")))
        del manifest["files"][VISION_EXTRA]
        json.dump(manifest, open(os.path.join(iter_dir, "manifest.json"), "w"))

    ckpt, _ = _copy_checkpoint(converted, tmp_path, drop_extras)
    # From --hf-vision: the whole tower again.
    export_checkpoint(ckpt, str(tmp_path / "full"), hf_vision=hf["siglip"], log=lambda _: None)
    vision, out = HFTensors(hf["siglip"]), HFTensors(str(tmp_path / "full"))
    assert all(torch.equal(out["vision_tower.vision_model." + k], vision[k]) for k in vision)
    # From nothing: the tower without its last layer, reading the same features through layer -1.
    logs = []
    export_checkpoint(ckpt, str(tmp_path / "cut"), log=logs.append)
    assert any("without its last layer" in line for line in logs)
    config = json.load(open(tmp_path / "cut" / "config.json"))
    assert config["vision_feature_layer"] == -1 and config["vision_config"]["num_hidden_layers"] == 1
    tokens, _ = _text_batch(300, seed=9)
    pixels = torch.randn(1 * 2, 3, 56, 56, generator=torch.Generator().manual_seed(10))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cut"), trust_remote_code=True).eval()
    with torch.no_grad():
        theirs = model(input_ids=tokens, pixel_values=pixels).logits
    torch.testing.assert_close(_megatron_logits(ckpt, tokens, pixels), theirs, atol=1e-4, rtol=0)



@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("case", ["ablation-arch", "truncated-checkpoint", "not-a-siglip-dir", "output-exists"])
def test_export_errors_leave_no_output(hf, converted, tmp_path, case):
    from himix_megatron.checkpoint import CheckpointError
    from himix_megatron.convert.hf_export import export_checkpoint
    from himix_megatron.model.vision import HFWeightError

    edit = {"ablation-arch": lambda d: set_model_field(d, "arch", "uniform"),
            "truncated-checkpoint": lambda d: os.remove(os.path.join(d, "__0_1.distcp"))}.get(case)
    ckpt, _ = _copy_checkpoint(converted, tmp_path, edit)
    output = tmp_path / "out"
    error, match, kwargs = {
        "ablation-arch": (ConversionError, "arch 'uniform' is one of the paper's ablations", {}),
        "truncated-checkpoint": (CheckpointError, r"__0_1.distcp is missing: the checkpoint is partial", {}),
        "not-a-siglip-dir": (HFWeightError, "expected exactly one SigLIP vision tower", {"hf_vision": hf["llama"]}),
        "output-exists": (ConversionError, "already exists; refusing to overwrite", {}),
    }[case]
    if case == "output-exists":
        os.makedirs(output / "keep")
    with pytest.raises(error, match=match):
        export_checkpoint(ckpt, str(output), log=lambda _: None, **kwargs)
    assert os.listdir(tmp_path) == (["ckpt", "out"] if case == "output-exists" else ["ckpt"])
    if case == "output-exists":
        assert os.listdir(output) == ["keep"]
