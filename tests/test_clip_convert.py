"""CLIP vision towers through the Hugging Face import and export, on tiny random models built here.

Import from a transformers CLIPVisionModel (HiMix at TP=2) and from a CLIPModel (vanilla at PP=2), export, and the
exported models' vision features and logits equal our megatron models' (HiMix: the remote-code model with a
CLIPVisionModel tower; vanilla: transformers' LlavaForConditionalGeneration with a CLIP vision_config); the whole
CLIP tower comes back bit for bit, its image processor preprocesses as our loader does, and bad CLIP configs and
tensors are refused by file, field and tensor before any rank starts.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from himix_megatron.config import ParallelConfig
from himix_megatron.convert import layout
from himix_megatron.convert.layout import ConversionError
from himix_megatron.data.templates import IMAGE_TOKEN_INDEX
from model_utils import randomize_hf
from test_convert import _megatron_logits, _save, _text_batch, hf  # noqa: F401 - `hf`: the tiny Llama fixture

TP2 = ParallelConfig(tensor_model_parallel_size=2)
PP2 = ParallelConfig(pipeline_model_parallel_size=2)
# d_v 48, 3 layers, 4 x 4 patches of 14 px: 16 features (the class token dropped). OpenAI CLIP's quick_gelu, and
# layer_norm_eps 1e-6, SigLIP's default rather than CLIP's (an exported config must keep it all the same).
TOWER = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=56,
             patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-6)
N = 16
PREFIX = "vision_tower.vision_model."


def _clip_model_config():
    return CLIPConfig(vision_config=TOWER, text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                            num_attention_heads=4, vocab_size=99))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Directories of a random CLIPVisionModel and of a random CLIPModel (its vision tower another one)."""
    root = tmp_path_factory.mktemp("clip")
    return {"vision": _save(randomize_hf(CLIPVisionModel(CLIPVisionConfig(**TOWER)), 11), root / "vision"),
            "model": _save(randomize_hf(CLIPModel(_clip_model_config()), 12), root / "model")}


def _tower_tensors(directory):
    """The CLIP tower's tensors of an HF directory, by CLIPVisionModel-relative name."""
    from himix_megatron.convert.hf_files import HFTensors
    from himix_megatron.model.vision import _vision_prefix

    tensors = HFTensors(directory)
    prefix = _vision_prefix(tensors, "CLIP")
    return {k[len(prefix):]: tensors[k] for k in tensors if k.startswith(prefix)}


# --- configs and errors (no model, no rank) -------------------------------------------------------


def test_vision_config_from_clip_vision_model_and_clip_model():
    from himix_megatron.config import VISION_ACTIVATIONS
    from himix_megatron.model.vision import ACTIVATIONS

    a = layout.vision_from_hf(CLIPVisionConfig(**TOWER).to_dict(), "v")
    b = layout.vision_from_hf(_clip_model_config().to_dict(), "v")
    assert a == b and (a.kind, a.hidden_act, a.norm_epsilon, a.num_features) == ("clip", "quick_gelu", 1e-6, N)
    assert layout.vision_from_hf(layout.vision_to_hf(a), "v") == a
    assert set(VISION_ACTIVATIONS) == set(ACTIVATIONS)  # what the import accepts is what the encoder computes


BAD_FIELDS = {
    "hidden_act": ({"hidden_act": "relu"}, r"vision hidden_act='relu' is not supported"),
    "image_size": ({"image_size": 60}, r"vision image_size=60 is not supported: not a multiple of patch_size=14"),
    "num_channels": ({"num_channels": 1}, r"vision num_channels=1 is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_unsupported_clip_fields_are_refused_by_file_and_field(case):
    change, match = BAD_FIELDS[case]
    with pytest.raises(ConversionError, match="clip/config.json: " + match):
        layout.vision_from_hf(CLIPVisionConfig(**{**TOWER, **change}).to_dict(), "v", where="clip/config.json")


BAD_TENSORS = {
    "no-class-embedding": (lambda t: t.pop("embeddings.class_embedding"),
                           r"missing vision tensor 'embeddings\.class_embedding'"),
    "position-embedding-shape": (lambda t: t.update({"embeddings.position_embedding.weight": torch.zeros(N, 48)}),
                                 r"vision tensor 'embeddings\.position_embedding\.weight' has shape \(16, 48\), "
                                 r"the config implies \(17, 48\)"),  # no position for the class token
    "no-pre-layernorm": (lambda t: t.pop("pre_layrnorm.bias"), r"missing vision tensor 'pre_layrnorm\.bias'"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_clip_tensors_are_refused_before_any_rank_starts(hf, clip, tmp_path, case):  # noqa: F811
    import shutil

    from safetensors.torch import save_file

    from himix_megatron.convert.hf_import import import_checkpoint

    bad = tmp_path / "bad"
    os.makedirs(bad)
    shutil.copy(os.path.join(clip["vision"], "config.json"), bad)
    tensors = _tower_tensors(clip["vision"])
    edit, match = BAD_TENSORS[case]
    edit(tensors)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match=f"{bad}: {match}"):
        import_checkpoint(hf["llama"], str(bad), "himix", TP2, str(tmp_path / "out"), log=lambda _: None)
    assert os.listdir(tmp_path) == ["bad"]


def test_himix_config_picks_the_tower_by_model_type(tmp_path):
    from transformers import SiglipVisionConfig

    from himix_megatron.hf.configuration_himix import HiMixConfig

    lm = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    clip_config = HiMixConfig(vision_config=layout.vision_to_hf(layout.vision_from_hf(TOWER | {
        "model_type": "clip_vision_model"}, "v")), **lm)
    assert isinstance(clip_config.vision_config, CLIPVisionConfig)
    clip_config.save_pretrained(tmp_path)
    again = HiMixConfig.from_pretrained(tmp_path).vision_config
    assert isinstance(again, CLIPVisionConfig)
    assert (again.hidden_act, again.layer_norm_eps, again.num_hidden_layers) == ("quick_gelu", 1e-6, 3)
    # A SigLIP vision_config, as every export before CLIP support wrote it (and one without a model_type).
    siglip = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=14)
    for fields in (dict(siglip, model_type="siglip_vision_model"), siglip):
        assert type(HiMixConfig(vision_config=fields, **lm).vision_config) is SiglipVisionConfig
    with pytest.raises(ValueError, match="vision_config.model_type='dinov2' is not supported"):
        HiMixConfig(vision_config=dict(siglip, model_type="dinov2"), **lm)


# --- import -> export ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(hf, clip, tmp_path_factory):  # noqa: F811
    """(checkpoint, export, report): Llama + the CLIPVisionModel as HiMix at TP=2, Llama + the CLIPModel's tower as
    vanilla at PP=2."""
    from himix_megatron.convert.hf_export import export_checkpoint
    from himix_megatron.convert.hf_import import import_checkpoint

    root = tmp_path_factory.mktemp("clip-converted")
    out = {}
    for key, vision, arch, parallel in (("himix", "vision", "himix", TP2), ("vanilla", "model", "vanilla", PP2)):
        ckpt, exported = str(root / f"{key}-ckpt"), str(root / f"{key}-hf")
        report = import_checkpoint(hf["llama"], clip[vision], arch, parallel, ckpt, template="tinyllama",
                                   log=lambda _: None)
        export_checkpoint(ckpt, exported, log=lambda _: None)
        out[key] = (ckpt, exported, report)
    return out


def _pixels(seed, batch=2):
    return torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def _encoder_features(ckpt, pixels):
    """Our encoder's features [b, N, d_v] (the layout HF models return)."""
    from himix_megatron.convert.hf_export import load_tp1

    _, _, _, encoder, _ = load_tp1(ckpt)
    with torch.no_grad():
        return encoder(pixels).transpose(0, 1)


def _random_image(seed, size):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _check_image_processor(image_processor, vision):
    """The export's image processor is CLIP's and gives our loader's pixels."""
    from himix_megatron.data.image import image_config_for, preprocess

    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert type(image_processor).__name__.startswith("CLIPImageProcessor")
    assert list(image_processor.image_mean) == list(OPENAI_CLIP_MEAN)
    assert list(image_processor.image_std) == list(OPENAI_CLIP_STD)
    image = _random_image(0, (60, 80))
    pixels = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, torch.from_numpy(preprocess(image, image_config_for(vision))), atol=1e-5,
                               rtol=0)


@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("key,vision", [("himix", "vision"), ("vanilla", "model")])
def test_round_trip_writes_the_whole_clip_tower_bit_for_bit(clip, converted, key, vision):
    from himix_megatron.convert.hf_files import HFTensors

    ckpt, exported, report = converted[key]
    assert report.description.vision.kind == "clip"
    out, source = HFTensors(exported), _tower_tensors(clip[vision])
    prefix = "vision_model." if vision == "model" else ""  # CLIPModel's tower / CLIPVisionModel's own names
    assert sorted(report.unused_vision_tensors) == sorted(prefix + k for k in source
                                                         if k.startswith(("encoder.layers.2.", "post_layernorm.")))
    tower = {k[len(PREFIX):] for k in out if k.startswith(PREFIX)}
    assert tower == set(source)  # the last layer and post_layernorm included, nothing else
    for name, tensor in source.items():
        assert torch.equal(out[PREFIX + name], tensor), name
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["vision_config"]["model_type"] == "clip_vision_model" and config["vision_feature_layer"] == -2
    assert config["vision_config"]["hidden_act"] == "quick_gelu" and config["vision_config"]["num_hidden_layers"] == 3


@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
def test_himix_export_features_and_logits_equal_ours(converted):
    from transformers import AutoModelForCausalLM, AutoProcessor

    ckpt, exported, _ = converted["himix"]
    tokens, _ = _text_batch(300, seed=21)
    pixels = _pixels(22)
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert type(model.vision_tower.vision_model).__name__ == "CLIPVisionModel"
    with torch.no_grad():
        features = model.get_vision_features(pixels)
        theirs = model(input_ids=tokens, pixel_values=pixels).logits
        other = model(input_ids=tokens, pixel_values=-pixels).logits
    assert features.shape == (2, N, 48)
    torch.testing.assert_close(features, _encoder_features(ckpt, pixels), atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, _megatron_logits(ckpt, tokens, pixels), atol=1e-4, rtol=0)
    assert (theirs - other).abs().max() > 1e-3  # the image really reached the text
    _check_image_processor(AutoProcessor.from_pretrained(exported, trust_remote_code=True).image_processor,
                           converted["himix"][2].description.vision)


@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
def test_vanilla_export_is_transformers_llava_with_a_clip_tower(converted):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ckpt, exported, report = converted["vanilla"]
    model, info = LlavaForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info
    config = model.config
    assert config.vision_config.model_type == "clip_vision_model" and config.image_seq_length == N
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    image_id = config.image_token_index
    tokens, _ = _text_batch(300, seed=23)
    tokens[:, 2] = IMAGE_TOKEN_INDEX  # training's ids: the image where the template put it
    pixels = _pixels(24)
    ids = torch.cat([tokens[:, :2], torch.full((2, N), image_id), tokens[:, 3:]], dim=1)
    at = [t + (N - 1) * (t >= 2) for t in range(tokens.shape[1])]  # the image id's output: the last image token's
    with torch.no_grad():
        theirs = model.eval()(input_ids=ids, pixel_values=pixels).logits[:, at, :300]
        # LLaVA's image features are after its projector: compare the tower's selection (vision_feature_layer,
        # "default": the class token dropped) with our encoder's features.
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[config.vision_feature_layer][:, 1:], _encoder_features(ckpt, pixels), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(theirs, _megatron_logits(ckpt, tokens, pixels), atol=1e-4, rtol=0)
    # The processor expands one <image> into the N features (the class token dropped) and preprocesses as ours.
    processor = AutoProcessor.from_pretrained(exported)
    batch = processor(images=_random_image(1, (50, 70)), text="<image> w5 w6", return_tensors="pt")
    assert int((batch["input_ids"] == image_id).sum()) == N
    _check_image_processor(processor.image_processor, report.description.vision)


@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
def test_export_without_the_vision_extras_keeps_clip_features(clip, converted, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from himix_megatron.convert.hf_export import export_checkpoint
    from himix_megatron.convert.hf_import import VISION_EXTRA

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(converted["himix"][0], ckpt)
    iter_dir = os.path.join(ckpt, "iter_0000000")
    os.remove(os.path.join(iter_dir, VISION_EXTRA))
    manifest = json.load(open(os.path.join(iter_dir, "manifest.json")))
    del manifest["files"][VISION_EXTRA]
    json.dump(manifest, open(os.path.join(iter_dir, "manifest.json"), "w"))
    logs = []
    export_checkpoint(ckpt, str(tmp_path / "cut"), log=logs.append)
    assert any("CLIP tensors our encoder does not hold" in line and "without its last layer" in line for line in logs)
    config = json.load(open(tmp_path / "cut" / "config.json"))
    assert config["vision_feature_layer"] == -1 and config["vision_config"]["num_hidden_layers"] == 2
    tokens, _ = _text_batch(300, seed=25)
    pixels = _pixels(26)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cut"), trust_remote_code=True).eval()
    with torch.no_grad():
        theirs = model(input_ids=tokens, pixel_values=pixels).logits
    torch.testing.assert_close(theirs, _megatron_logits(ckpt, tokens, pixels), atol=1e-4, rtol=0)
    # --hf-vision gives the whole tower back; a CLIP directory that is not the tower is refused by tensor.
    export_checkpoint(ckpt, str(tmp_path / "full"), hf_vision=clip["vision"], log=lambda _: None)
    assert json.load(open(tmp_path / "full" / "config.json"))["vision_config"]["num_hidden_layers"] == 3
