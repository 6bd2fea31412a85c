"""The SigLIP encoder against transformers' SiglipVisionModel: features, freezing, sizes, weight errors."""

import dataclasses

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from himix_megatron.config import ParallelConfig, vision_model_preset

TINY = vision_model_preset("tiny")
SO400M = vision_model_preset("siglip-so400m-384")


def _hf_config(v, **kwargs):
    return SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.norm_epsilon, hidden_act="gelu_pytorch_tanh", **kwargs,
    )


def _random_hf(v, seed=0):
    """A tiny SiglipVisionModel with every tensor random, LayerNorm scales and biases included."""
    torch.manual_seed(seed)
    hf = SiglipVisionModel(_hf_config(v)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    return hf


def _hf_features(hf, pixels):
    with torch.no_grad():
        hidden = hf(pixels, output_hidden_states=True).hidden_states
    return hidden[-2][:, 1:].transpose(0, 1)  # penultimate layer, first patch dropped, [N, b, d]


def _encoder(v, parallel=ParallelConfig(), **overrides):
    from himix_megatron.model.vision import VisionEncoder, build_vision_config

    return VisionEncoder(build_vision_config(v, parallel, **overrides), v)


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("image_size", [56, 60], ids=["whole-patches", "cropped-border"])
def test_features_match_transformers(image_size):
    from himix_megatron.model.vision import load_hf_siglip_state_dict

    v = dataclasses.replace(TINY, image_size=image_size)  # 60: like SigLIP-384, a border the conv skips
    hf = _random_hf(v)
    encoder = _encoder(v)
    unused = load_hf_siglip_state_dict(encoder, hf.state_dict())
    last = f"encoder.layers.{v.num_layers - 1}."
    assert unused and all(k.startswith((last, "post_layernorm.", "head.")) for k in unused)
    assert {"post_layernorm.weight", "head.probe", last + "mlp.fc2.weight"} <= set(unused)

    pixels = torch.randn(2, 3, image_size, image_size)
    features = encoder(pixels)
    expected = _hf_features(hf, pixels)
    assert features.shape == (v.num_features, 2, v.hidden_size) == expected.shape
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=0)


@pytest.mark.usefixtures("single_rank")
def test_loads_from_a_full_siglip_model_prefix():
    from himix_megatron.model.vision import load_hf_siglip_state_dict

    hf = _random_hf(TINY)
    # A SiglipModel checkpoint nests the tower under `vision_model.` next to the text model.
    nested = {"vision_model." + k: t for k, t in hf.state_dict().items()}
    nested["text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)
    encoder = _encoder(TINY)
    unused = load_hf_siglip_state_dict(encoder, nested)
    assert all(k.startswith("vision_model.") for k in unused)
    pixels = torch.randn(1, 3, TINY.image_size, TINY.image_size)
    torch.testing.assert_close(encoder(pixels), _hf_features(hf, pixels), atol=1e-4, rtol=0)


@pytest.mark.usefixtures("single_rank")
def test_frozen():
    encoder = _encoder(TINY)
    params = list(encoder.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert encoder.train() is encoder and not encoder.training
    assert not any(m.training for m in encoder.modules())
    pixels = torch.randn(1, 3, TINY.image_size, TINY.image_size, requires_grad=True)
    features = encoder(pixels)
    assert features.grad_fn is None and not features.requires_grad


@pytest.mark.usefixtures("single_rank")
def test_so400m_shape_and_parameter_count_on_meta():
    with torch.device("meta"):
        encoder = _encoder(SO400M, use_cpu_initialization=True, perform_initialization=False)
        features = encoder(torch.empty(2, 3, 384, 384))
    assert features.shape == (728, 2, 1152)

    # Exact SigLIP so400m count, by hand: patch conv + position embeddings + 27 layers + post-LN + head.
    d, f, p, n = 1152, 4304, 14, 27 * 27
    layer = 2 * 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
    head = d + 3 * (d * d + d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    full = (3 * p * p * d + d) + n * d + 27 * layer + 2 * d + head
    assert full == 428_225_600  # the "0.43 B" of SigLIP so400m
    ours = sum(t.numel() for t in encoder.parameters())
    assert ours == full - layer - 2 * d - head == 397_745_440
    # transformers' own model agrees (built on meta: nothing allocated).
    with torch.device("meta"):
        hf = SiglipVisionModel(_hf_config(SO400M))
    assert sum(t.numel() for t in hf.parameters()) == full


@pytest.mark.usefixtures("single_rank")
def test_clear_errors_on_missing_or_misshaped_tensors():
    from himix_megatron.model.vision import HFWeightError, load_hf_siglip_state_dict

    state = _random_hf(TINY).state_dict()
    encoder = _encoder(TINY)
    missing = {k: t for k, t in state.items() if k != "encoder.layers.0.layer_norm2.bias"}
    with pytest.raises(HFWeightError, match=r"missing .*'encoder\.layers\.0\.layer_norm2\.bias'"):
        load_hf_siglip_state_dict(encoder, missing)
    bad = dict(state, **{"encoder.layers.0.self_attn.k_proj.weight": torch.zeros(48, 40)})
    with pytest.raises(HFWeightError, match=r"shape mismatch .*'encoder\.layers\.0\.self_attn\.k_proj\.weight'"):
        load_hf_siglip_state_dict(encoder, bad)
    with pytest.raises(HFWeightError, match="vision tower"):
        load_hf_siglip_state_dict(encoder, {"text_model.x": torch.zeros(1)})
