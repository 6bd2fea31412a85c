"""Presets build models of the published sizes; impossible configurations are refused up front."""

import pytest
import torch

from himix_megatron.config import (
    LANGUAGE_MODELS,
    ConfigError,
    ParallelConfig,
    build_transformer_config,
    language_model_preset,
    validate,
    vision_model_preset,
)
from himix_megatron.flops import decoder_cost

SIGLIP = vision_model_preset("siglip-so400m-384")

# Decoder parameters in billions, vanilla -> HiMix (DESIGN.md section 1, the paper's Table 3 / 8).
PUBLISHED = {
    "qwen2-0.5b": ("0.49", "0.50"),
    "tinyllama-1.1b": ("1.10", "1.11"),
    "llama3.2-1b": ("1.236", "1.255"),
    "llama3.2-3b": ("3.21", "3.28"),
    "vicuna-7b": ("6.74", "7.04"),
}


def _count_on_meta(model_cls, lm, **kwargs):
    config = build_transformer_config(lm, SIGLIP, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        model = model_cls(config, lm, **kwargs) if model_cls.__name__ == "HiMixModel" else model_cls(config)
    return sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates tied weights


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from himix_megatron.model.himix_model import HiMixModel

    lm = language_model_preset(name)
    himix = _count_on_meta(HiMixModel, lm)
    config = build_transformer_config(lm, SIGLIP, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        vanilla = sum(p.numel() for p in GPTModel(
            config, get_gpt_layer_local_spec(normalization="RMSNorm"), lm.vocab_size, 4096,
            share_embeddings_and_output_weights=lm.tie_embeddings, position_embedding_type="rope",
        ).parameters())
    added = lm.num_layers * (2 * SIGLIP.hidden_size * lm.kv_dim + SIGLIP.hidden_size + (2 * lm.kv_dim if lm.qkv_bias else 0))
    assert himix - vanilla == added
    vanilla_b, himix_b = PUBLISHED[name]
    digits = len(vanilla_b.split(".")[1])
    assert f"{vanilla / 1e9:.{digits}f}" == vanilla_b
    assert f"{himix / 1e9:.{digits}f}" == himix_b
    # The FLOPs module's analytic count agrees with the model actually built.
    assert decoder_cost(lm, "himix", 728, 64, SIGLIP.hidden_size).params == himix
    assert decoder_cost(lm, "vanilla", 728, 64, SIGLIP.hidden_size).params == vanilla


@pytest.mark.parametrize(
    "model,parallel,message",
    [
        ("tinyllama-1.1b", ParallelConfig(tensor_model_parallel_size=3), "does not divide tinyllama-1.1b's num_attention_heads=32"),
        ("qwen2-0.5b", ParallelConfig(tensor_model_parallel_size=7), "does not divide qwen2-0.5b's num_query_groups=2"),
        ("llama3.2-1b", ParallelConfig(pipeline_model_parallel_size=3), "does not divide llama3.2-1b's num_layers=16"),
        ("llama3.2-1b", ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3),
         "virtual_pipeline_model_parallel_size=3 does not divide"),
        ("tiny", ParallelConfig(virtual_pipeline_model_parallel_size=2), "needs pipeline_model_parallel_size >= 2"),
        ("tiny", ParallelConfig(sequence_parallel=True), "sequence_parallel needs tensor_model_parallel_size >= 2"),
        ("tiny", ParallelConfig(tensor_model_parallel_size=0), "tensor_model_parallel_size=0 must be >= 1"),
    ],
)
def test_parallel_layout_refused(model, parallel, message):
    with pytest.raises(ConfigError, match=message):
        validate(language_model_preset(model), parallel)


def test_unknown_presets_and_fields_refused():
    with pytest.raises(ConfigError, match="unknown language model preset 'llama-9b'"):
        language_model_preset("llama-9b")
    with pytest.raises(ConfigError, match="unknown vision model preset 'clip'"):
        vision_model_preset("clip")
    with pytest.raises(ConfigError, match="arch='llava' is not one of"):
        validate(language_model_preset("tiny"), ParallelConfig(), arch="llava")
    with pytest.raises(ConfigError, match=r"unknown TransformerConfig field\(s\): \['hiden_size'\]"):
        build_transformer_config(language_model_preset("tiny"), vision_model_preset("tiny"), hiden_size=3)


def test_every_preset_is_internally_consistent():
    for lm in LANGUAGE_MODELS.values():
        validate(lm, ParallelConfig())
        assert lm.num_attention_heads * lm.kv_channels == lm.hidden_size


@pytest.mark.usefixtures("single_rank")
def test_sequence_parallel_refused_on_local_spec():
    from himix_megatron.model.himix_model import HiMixModel

    lm = language_model_preset("tiny")
    config = build_transformer_config(lm, vision_model_preset("tiny"), use_cpu_initialization=True)
    config.sequence_parallel = True  # what a TP>=2 run with --sequence-parallel would carry
    with pytest.raises(ConfigError, match="sequence_parallel needs the Transformer Engine spec"):
        HiMixModel(config, lm, use_te=False)
