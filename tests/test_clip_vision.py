"""The CLIP encoder against transformers' CLIPVisionModel: LLaVA's features, weight errors, the presets."""

import dataclasses

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from himix_megatron.config import ConfigError, VisionModelConfig, vision_model_preset

TINY = vision_model_preset("tiny-clip")


def _hf_config(v):
    return CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.norm_epsilon, hidden_act=v.hidden_act,
    )


def _randomize(module, seed=0):
    """Every tensor random, LayerNorm scales and biases and the class embedding included."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module.eval()


def _random_hf(v, seed=0):
    return _randomize(CLIPVisionModel(_hf_config(v)), seed)


def _hf_features(hf, pixels):
    """LLaVA's selection: hidden_states[-2], class token dropped, as [N, b, d]."""
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    return hidden[-2][:, 1:].transpose(0, 1)


def _encoder(v, **overrides):
    from himix_megatron.model.vision import VisionEncoder, build_vision_config

    return VisionEncoder(build_vision_config(v, **overrides), v)


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_features_match_transformers(hidden_act):
    from himix_megatron.model.vision import load_hf_clip_state_dict, load_hf_vision_state_dict

    v = dataclasses.replace(TINY, hidden_act=hidden_act)
    hf = _random_hf(v)
    encoder = _encoder(v)
    assert encoder.class_token.shape == (1, 1, v.hidden_size) and encoder.conv1.bias is None
    unused = load_hf_clip_state_dict(encoder, hf.state_dict())
    last = f"encoder.layers.{v.num_layers - 1}."
    assert unused and all(k.startswith((last, "post_layernorm.")) for k in unused)
    assert {"post_layernorm.weight", last + "mlp.fc2.weight"} <= set(unused)

    pixels = torch.randn(2, 3, v.image_size, v.image_size)
    features = encoder(pixels)
    expected = _hf_features(hf, pixels)
    assert features.shape == (v.num_features, 2, v.hidden_size) == expected.shape == (16, 2, 48)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)

    # the kind-dispatching loader gives the same encoder
    again = _encoder(v)
    load_hf_vision_state_dict(again, hf.state_dict())
    torch.testing.assert_close(again(pixels), features, atol=0, rtol=0)


@pytest.mark.usefixtures("single_rank")
def test_loads_the_vision_tower_of_a_clip_model():
    from himix_megatron.model.vision import load_hf_clip_state_dict

    config = CLIPConfig(vision_config=_hf_config(TINY).to_dict(),
                        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=99))
    clip = _randomize(CLIPModel(config))
    state = clip.state_dict()
    assert "visual_projection.weight" in state and "vision_model.pre_layrnorm.weight" in state
    encoder = _encoder(TINY)
    unused = load_hf_clip_state_dict(encoder, state)
    assert unused and all(k.startswith("vision_model.") for k in unused)

    pixels = torch.randn(1, 3, TINY.image_size, TINY.image_size)
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(encoder(pixels), hidden[-2][:, 1:].transpose(0, 1), atol=1e-5, rtol=0)


@pytest.mark.usefixtures("single_rank")
def test_clear_errors_on_missing_or_misshaped_tensors():
    from himix_megatron.model.vision import HFWeightError, load_hf_clip_state_dict

    state = _random_hf(TINY).state_dict()
    encoder = _encoder(TINY)
    for key in ("embeddings.class_embedding", "pre_layrnorm.bias", "encoder.layers.1.mlp.fc1.weight"):
        with pytest.raises(HFWeightError, match=rf"missing .*'{key.replace('.', '[.]')}'"):
            load_hf_clip_state_dict(encoder, {k: t for k, t in state.items() if k != key})
    bad = dict(state, **{"encoder.layers.0.self_attn.v_proj.weight": torch.zeros(48, 40)})
    with pytest.raises(HFWeightError, match=r"shape mismatch .*'encoder\.layers\.0\.self_attn\.v_proj\.weight'"):
        load_hf_clip_state_dict(encoder, bad)
    bad = dict(state, **{"embeddings.position_embedding.weight": torch.zeros(16, 48)})  # no class position
    with pytest.raises(HFWeightError, match=r"shape mismatch .*'embeddings\.position_embedding\.weight'.*\(17, 48\)"):
        load_hf_clip_state_dict(encoder, bad)
    with pytest.raises(HFWeightError, match="CLIP vision tower"):
        load_hf_clip_state_dict(encoder, {"text_model.x": torch.zeros(1)})
    with pytest.raises(HFWeightError, match="not a CLIP one"):
        load_hf_clip_state_dict(_encoder(vision_model_preset("tiny")), state)


@pytest.mark.usefixtures("single_rank")
def test_frozen():
    encoder = _encoder(TINY)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.train().training
    pixels = torch.randn(1, 3, TINY.image_size, TINY.image_size, requires_grad=True)
    assert not encoder(pixels).requires_grad


# N and d_v of the paper's Table 6 (FeatDim) and of LLaVA-1.5's ViT-L/14-336.
FEATURES = {"tinyclip-39m": (196, 512), "tinyclip-40m": (49, 512), "tinyclip-61m": (49, 640),
            "clip-vit-l-14-336": (576, 1024), "siglip-so400m-384": (728, 1152)}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_presets_feature_shapes(name):
    v = vision_model_preset(name)
    assert (v.num_features, v.hidden_size) == FEATURES[name]
    assert v.kind == ("siglip" if name.startswith("siglip") else "clip")
    assert v.hidden_size // v.num_attention_heads == (72 if v.kind == "siglip" else 64)  # head widths


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("name", ["tinyclip-39m", "tinyclip-40m", "tinyclip-61m", "clip-vit-l-14-336"])
def test_presets_build_on_meta_like_transformers(name):
    v = vision_model_preset(name)
    with torch.device("meta"):
        encoder = _encoder(v, use_cpu_initialization=True, perform_initialization=False)
        features = encoder(torch.empty(2, 3, v.image_size, v.image_size))
        hf = CLIPVisionModel(_hf_config(v))
    assert features.shape == (v.num_features, 2, v.hidden_size)
    # ours = HF's CLIPVisionModel minus its last layer and post-layernorm
    d, f = v.hidden_size, v.ffn_hidden_size
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    hf_params = sum(t.numel() for t in hf.parameters())
    assert sum(t.numel() for t in encoder.parameters()) == hf_params - layer - 2 * d


def test_old_siglip_configs_still_load_and_bad_fields_are_refused():
    old = {f.name: getattr(vision_model_preset("tiny"), f.name)
           for f in dataclasses.fields(VisionModelConfig) if f.name not in ("kind", "hidden_act")}
    v = VisionModelConfig(**old)  # a himix.json written before CLIP support
    assert (v.kind, v.hidden_act, v.num_features) == ("siglip", "gelu_pytorch_tanh", 15)
    with pytest.raises(ConfigError, match="kind"):
        dataclasses.replace(v, kind="dino")
    with pytest.raises(ConfigError, match="hidden_act"):
        dataclasses.replace(v, hidden_act="relu")


@pytest.mark.usefixtures("single_rank")
def test_clip_needs_whole_patches():
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        _encoder(dataclasses.replace(TINY, image_size=60))
