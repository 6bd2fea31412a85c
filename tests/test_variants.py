"""The paper's Fig. 4 ablations: parameters, shapes, the shared K/V projection, and what they refuse."""

import pytest
import torch
import torch.nn.functional as F

from himix_megatron.config import ConfigError, ParallelConfig, build_transformer_config, language_model_preset
from himix_megatron.flops import decoder_cost
from model_utils import TINY_LM, TINY_VISION, build_tiny, tiny_batch, vanilla_slot

pytestmark = pytest.mark.usefixtures("single_rank")
D, D_V = TINY_LM.hidden_size, TINY_VISION.hidden_size
CONNECTOR = {  # a LLaVA mlp2x_gelu connector, d_v -> d -> d
    "linear_fc1.weight": (D, D_V), "linear_fc1.bias": (D,), "linear_fc2.weight": (D, D), "linear_fc2.bias": (D,),
}


@pytest.mark.parametrize("arch", ["himix", "uniform", "hierarchical"])
def test_vision_parameters_and_count(arch):
    model = build_tiny(arch)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    vision = {n: s for n, s in shapes.items() if "vision" in n}
    if arch == "himix":
        expected = {}
        for i in range(TINY_LM.num_layers):
            expected[f"decoder.layers.{i}.self_attention.vision_norm.weight"] = (D_V,)
            expected[f"decoder.layers.{i}.self_attention.linear_kv_vision.weight"] = (2 * TINY_LM.kv_dim, D_V)
    elif arch == "uniform":
        expected = {f"vision_projection.encoder.{k}": s for k, s in CONNECTOR.items()}
    else:
        expected = {f"decoder.layers.{i}.self_attention.vision_connector.{k}": s
                    for i in range(TINY_LM.num_layers) for k, s in CONNECTOR.items()}
    assert vision == expected
    cost = decoder_cost(TINY_LM, arch, TINY_VISION.num_features, 8, D_V)
    assert sum(p.numel() for p in model.parameters()) == cost.params + cost.connector_params


def test_shared_key_value_uses_the_text_projection_rows():
    """Vision K/V of the variants are exactly the K and V rows of the layer's linear_qkv applied to the input."""
    model = build_tiny("uniform")
    attention = model.decoder.layers[1].self_attention
    x = torch.randn(5, 2, D)
    key, value = attention.vision_key_value(x)
    per_group = TINY_LM.num_attention_heads // TINY_LM.num_query_groups
    hn = TINY_LM.kv_channels
    qkv = F.linear(x, attention.linear_qkv.weight).view(5, 2, TINY_LM.num_query_groups, per_group + 2, hn)
    torch.testing.assert_close(key, qkv[..., per_group, :])
    torch.testing.assert_close(value, qkv[..., per_group + 1, :])


@pytest.mark.parametrize("arch", ["himix", "vanilla", "uniform", "hierarchical"])
def test_every_parameter_gets_a_gradient(arch):
    model = build_tiny(arch)
    tokens, positions, vision, labels = tiny_batch(image_slot=vanilla_slot(arch))
    model(tokens, positions, vision, labels=labels).mean().backward()
    untrained = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not untrained


def test_uniform_refuses_pipeline_parallelism():
    from himix_megatron.model.himix_model import HiMixModel

    config = build_transformer_config(TINY_LM, TINY_VISION, ParallelConfig(), arch="uniform", use_cpu_initialization=True)
    config.pipeline_model_parallel_size = 2  # as a PP=2 run would carry
    with pytest.raises(ConfigError, match="'uniform' shares one connector"):
        HiMixModel(config, TINY_LM)


def test_model_class_refuses_unknown_arch():
    from himix_megatron.model import model_class

    with pytest.raises(ConfigError, match="arch='llava' is not one of"):
        model_class("llava")


@pytest.mark.parametrize("arch", ["uniform", "hierarchical"])
def test_preset_variant_counts_match_accounting(arch):
    from himix_megatron.config import vision_model_preset
    from himix_megatron.model import model_class

    lm, siglip = language_model_preset("qwen2-0.5b"), vision_model_preset("siglip-so400m-384")
    config = build_transformer_config(lm, siglip, arch=arch, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        model = model_class(arch)(config, lm)
    cost = decoder_cost(lm, arch, 728, 64, siglip.hidden_size)
    assert sum(p.numel() for p in model.parameters()) == cost.params + cost.connector_params
