"""FP8 recipes (issue 25): what each recipe needs from the GPU and TE, the model shapes it takes, the flags that
reach megatron-core's recipe construction, the frozen encoder outside FP8, and the vision rows padded inside the
layer. Everything here runs without a GPU; the self-check (tools/gpu_selfcheck.py) trains under each recipe."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from model_utils import TINY_VISION, build_tiny

from himix_megatron.config import ConfigError, language_model_preset, vision_model_preset
from himix_megatron.training import fp8
from himix_megatron.training.config import check, parse_args


def _cfg(tmp_path, *extra):
    (tmp_path / "a").mkdir(exist_ok=True)
    return parse_args(["--data-path", str(tmp_path / "a"), "--train-iters", "10", "--bf16", *extra])


@pytest.mark.parametrize("recipe, capability, te, cuda, problem", [
    ("delayed", (9, 0), "2.9.0", "12.9", None),
    ("tensorwise", (9, 0), "2.9.0", "12.9", None),
    ("blockwise", (9, 0), "2.9.0", "12.9", None),
    ("mxfp8", (9, 0), "2.9.0", "12.9", r"compute capability 9.0: --fp8-recipe mxfp8 needs 10.0 or newer \(Blackwell\)"),
    ("mxfp8", (10, 0), "2.9.0", "12.9", None),
    ("blockwise", (10, 0), "2.11.0", "13.0", None),
    ("mxfp8", (12, 0), "2.9.0", "12.9", r"does not serve --fp8-recipe mxfp8 on 12.0\+ GPUs"),
    ("delayed", (8, 0), "2.9.0", "12.9", r"compute capability 8.0: --fp8-recipe delayed needs 8.9"),
    ("tensorwise", (8, 9), "2.9.0", "12.9", None),
    ("blockwise", (8, 9), "2.9.0", "12.9", r"needs 9.0 or newer"),
    ("blockwise", (9, 0), "2.9.0", "12.8", r"needs CUDA >= 12.9 \(torch was built with 12.8\)"),
    ("tensorwise", (9, 0), "2.1.0", "12.9", r"needs Transformer Engine >= 2.2.0.dev0 \(found 2.1.0\)"),
    ("delayed", (9, 0), None, "12.9", r"needs Transformer Engine >= 2.0 \(found none\)"),
])
def test_each_recipe_names_what_the_gpu_or_te_lacks(recipe, capability, te, cuda, problem):
    found = fp8.recipe_problem(recipe, capability, te, cuda)
    if problem is None:
        assert found is None
    else:
        assert found is not None and re.search(problem, found), found


def test_recipe_flags_reach_megatron_core_and_the_encoder_stays_out_of_fp8(tmp_path, single_rank):
    """The flags become TransformerConfig's fp8 / fp8_recipe / fp8_param, from which megatron-core builds TE's
    recipe; the frozen encoder's config carries none of them, under every recipe."""
    from himix_megatron.checkpoint import ModelDescription, build_model
    from himix_megatron.config import ParallelConfig

    description = ModelDescription("himix", language_model_preset("tiny"), vision_model_preset("tiny"))
    assert fp8.transformer_overrides(_cfg(tmp_path)) == {}
    for recipe in fp8.FP8_RECIPES:
        cfg = _cfg(tmp_path, "--fp8-format", "e4m3", "--fp8-recipe", recipe, "--fp8-param-gather",
                   "--use-distributed-optimizer")
        overrides = fp8.transformer_overrides(cfg)
        assert (overrides["fp8"], overrides["fp8_recipe"], overrides["fp8_param"]) == ("e4m3", recipe, True)
        assert ("fp8_amax_history_len" in overrides) == (recipe == "delayed")  # delayed scaling's own knobs
        chunks, encoder = build_model(description, ParallelConfig(), **overrides)
        assert (chunks[0].config.fp8, chunks[0].config.fp8_recipe, chunks[0].config.fp8_param) == ("e4m3", recipe, True)
        assert encoder.config.fp8 is None and not encoder.config.fp8_param


def test_fp8_param_gather_needs_fp8_and_the_distributed_optimizer(tmp_path):
    with pytest.raises(ConfigError, match="--fp8-param-gather .* needs --fp8-format"):
        check(_cfg(tmp_path, "--fp8-param-gather", "--use-distributed-optimizer"), 1, te_available=True, cuda=True)
    with pytest.raises(ConfigError, match="--fp8-param-gather needs --use-distributed-optimizer"):
        check(_cfg(tmp_path, "--fp8-format", "hybrid", "--fp8-param-gather"), 1, te_available=True, cuda=True)
    check(_cfg(tmp_path, "--fp8-format", "hybrid", "--fp8-param-gather", "--use-distributed-optimizer"), 1,
          te_available=True, cuda=True)
    with pytest.raises(SystemExit):  # argparse: not a recipe megatron-core builds
        _cfg(tmp_path, "--fp8-format", "hybrid", "--fp8-recipe", "nvfp4")


def test_row_multiples_follow_the_recipe(tmp_path):
    from himix_megatron.training.data import row_multiple

    assert row_multiple(_cfg(tmp_path)) == 8
    assert row_multiple(_cfg(tmp_path, "--fp8-format", "hybrid")) == 16
    assert row_multiple(_cfg(tmp_path, "--fp8-format", "hybrid", "--fp8-recipe", "blockwise")) == 16
    assert row_multiple(_cfg(tmp_path, "--fp8-format", "hybrid", "--fp8-recipe", "mxfp8", "--sequence-parallel",
                             "--tensor-model-parallel-size", "2")) == 64
    # Blockwise under sequence parallelism: TE all-gathers the FP8 input, in 128-row blocks per rank.
    assert row_multiple(_cfg(tmp_path, "--fp8-format", "hybrid", "--fp8-recipe", "blockwise", "--sequence-parallel",
                             "--tensor-model-parallel-size", "2")) == 256
    with pytest.raises(ConfigError, match=r"--seq-length 2080 / TP 2 x --micro-batch-size 1, to be a multiple of 128"):
        check(_cfg(tmp_path, "--fp8-format", "hybrid", "--fp8-recipe", "blockwise", "--sequence-parallel",
                   "--tensor-model-parallel-size", "2", "--pad-to-seq-length", "--seq-length", "2080"), 2,
              te_available=True, cuda=True)


def test_model_shapes_each_recipe_refuses(tmp_path):
    from himix_megatron.checkpoint import ModelDescription

    vicuna, siglip = language_model_preset("vicuna-7b"), vision_model_preset("siglip-so400m-384")
    for recipe in fp8.FP8_RECIPES:  # the paper's model: every GEMM dimension is a multiple of 32
        assert fp8.layout_problems(recipe, ModelDescription("himix", vicuna, siglip), 1, False) == []
        fp8.check_layout(_cfg(tmp_path, "--fp8-format", "hybrid", "--fp8-recipe", recipe),
                         ModelDescription("himix", vicuna, siglip))
    # HiMix pads its vision rows itself, so any N serves; vanilla's N sits inside its sequence.
    odd = dataclasses.replace(siglip, image_size=392)  # N = 28 x 28 - 1 = 783
    assert odd.num_features == 783 and fp8.layout_problems("delayed", ModelDescription("himix", vicuna, odd)) == []
    assert fp8.layout_problems("delayed", ModelDescription("vanilla", vicuna, odd), micro_batch_size=16) == []
    assert fp8.layout_problems("delayed", ModelDescription("vanilla", vicuna, siglip), micro_batch_size=1) == [
        "the N x micro-batch = 728 x 1 image tokens of a micro-batch are not a multiple of 16 (choose "
        "--micro-batch-size accordingly)"]
    assert fp8.layout_problems("delayed", ModelDescription("vanilla", vicuna, siglip), micro_batch_size=2) == []
    assert fp8.layout_problems("delayed", ModelDescription("vanilla", vicuna, siglip), packed=True) == [
        "the N = 728 image tokens of each image in a packed row are not a multiple of 16"]
    assert fp8.layout_problems("delayed", ModelDescription("vanilla", vicuna, siglip), 2, True) == [
        "the N = 728 image tokens in vanilla's sequence are not a multiple of 32 (16 per TP rank under "
        "--sequence-parallel)"]
    assert fp8.layout_problems("blockwise", ModelDescription("himix", vicuna, siglip), 2, True) == []
    assert fp8.layout_problems("blockwise", ModelDescription("himix", language_model_preset("tiny"), siglip),
                               2, True) == ["hidden size 64 is not a multiple of 128 (blockwise FP8 all-gathers the "
                                            "sequence-parallel input in 128-wide blocks)"]
    tiny = ModelDescription("himix", language_model_preset("tiny"), TINY_VISION)  # d_v 48
    assert fp8.layout_problems("delayed", tiny, 1, False) == []
    with pytest.raises(ConfigError, match=r"--fp8-recipe mxfp8 needs every FP8 GEMM dimension to be a multiple of "
                                          r"32, but vision width d_v .* 48 is not a multiple of 32"):
        fp8.check_layout(_cfg(tmp_path, "--fp8-format", "hybrid", "--fp8-recipe", "mxfp8"), tiny)


@pytest.mark.parametrize("arch", ["himix", "hierarchical"])
@pytest.mark.parametrize("recipe", ["delayed", "mxfp8"])
def test_vision_rows_are_padded_to_the_recipe_and_the_result_is_exact(arch, recipe, monkeypatch, single_rank):
    """Bug 2 of issue 25: a mixed batch (or a packed row) keeps only its images' columns, so the vision GEMMs
    see N x images rows, any number. Under FP8 they are padded to the recipe's multiple inside the layer; the
    K/V and the weight gradients equal the unpadded computation's."""
    from himix_megatron.model import vision_kv

    plain = build_tiny(arch, seed=3)
    padded = build_tiny(arch, seed=3, fp8="hybrid", fp8_recipe=recipe)
    rows_seen = []
    fused = vision_kv.vision_key_value
    monkeypatch.setattr(vision_kv, "vision_key_value", lambda x, *a: rows_seen.append(x.shape[0] * x.shape[1]) or
                        fused(x, *a))
    features = torch.randn(7, 3, TINY_VISION.hidden_size, generator=torch.Generator().manual_seed(0))  # 21 rows
    results = []
    for model in (plain, padded):
        attention = model.decoder.layers[0].self_attention
        if attention.vision_connector is not None:
            attention.vision_connector.register_forward_pre_hook(
                lambda m, args: rows_seen.append(args[0].shape[0] * args[0].shape[1]))
        key, value = attention.vision_key_value(features)
        weights = torch.randn(key.shape, generator=torch.Generator().manual_seed(1))
        ((key * weights).sum() + value.square().sum()).backward()
        results.append((key.detach(), value.detach(),
                        {n: p.grad.clone() for n, p in attention.named_parameters() if p.grad is not None}))
    assert rows_seen == [21, 32]  # 21 rows -> the next multiple of 16 (delayed) or of 32 (mxfp8): 32 both
    (k0, v0, g0), (k1, v1, g1) = results
    assert k1.shape == k0.shape == (7, 3, *k0.shape[2:])
    torch.testing.assert_close(k1, k0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v1, v0, atol=1e-6, rtol=1e-5)
    assert set(g0) == set(g1) and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_trainer_asks_this_gpu_before_building_anything(tmp_path, monkeypatch):
    from himix_megatron.training import trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100
    with pytest.raises(ConfigError, match=r"compute capability 8.0: --fp8-recipe tensorwise needs 8.9 or newer; "
                                          r"choose another --fp8-recipe, or drop --fp8-format"):
        trainer.check_gpu(_cfg(tmp_path, "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"))
    trainer.check_gpu(_cfg(tmp_path))  # bf16 asks nothing of the GPU here
