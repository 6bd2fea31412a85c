"""Vision-encoder parameters and FLOPs against the paper's Table 6 and a hand count."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from himix_megatron.config import VisionModelConfig, vision_model_preset
from himix_megatron.flops import main, vision_encoder_cost

REPO = Path(__file__).resolve().parents[1]
TOL = 0.04

# Paper Table 6: (Params in B, FLOPs in G) per image.
TABLE6 = {
    "siglip-so400m-384": (0.428, 670.89),
    "tinyclip-39m": (0.038, 15.04),
    "tinyclip-40m": (0.039, 3.93),
    "tinyclip-61m": (0.061, 6.10),
}


@pytest.mark.parametrize("name", sorted(TABLE6))
def test_table6_params_to_the_printed_digits(name):
    assert round(vision_encoder_cost(vision_model_preset(name)).params / 1e9, 3) == TABLE6[name][0]


def _flops_cells():
    for name in sorted(TABLE6):
        marks = []
        if name == "tinyclip-39m":
            marks = [pytest.mark.xfail(strict=True, reason="+6.3%: the paper's TinyCLIP counts omit QK^T and AV "
                                                           "(see vision_encoder_cost's docstring)")]
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_flops_cells()))
def test_table6_flops_within_tolerance(name):
    flops = vision_encoder_cost(vision_model_preset(name)).flops / 1e9
    assert abs(flops / TABLE6[name][1] - 1) <= TOL, flops


@pytest.mark.parametrize("name", ["tinyclip-39m", "tinyclip-40m", "tinyclip-61m"])
def test_tinyclip_cells_are_the_count_without_attention_matmuls(name):
    """The explanation of the 39M/16 cell, checked on all three TinyCLIP cells (0.15%)."""
    cost = vision_encoder_cost(vision_model_preset(name))
    assert abs((cost.flops - cost.attn_core_flops) / 1e9 / TABLE6[name][1] - 1) <= 0.002


def test_siglip_needs_attention_and_head():
    cost = vision_encoder_cost(vision_model_preset("siglip-so400m-384"))
    assert abs(cost.flops / 1e9 / 670.89 - 1) < 0.001
    assert (cost.flops - cost.attn_core_flops) / 1e9 / 670.89 - 1 < -0.09  # without QK^T/AV: far off
    assert abs((cost.flops - cost.head_flops) / 1e9 / 670.89 - 1) > 0.005  # the head's 3.9 G is visible
    assert cost.params == 428_225_600 and cost.feature_params == 397_745_440  # tests/test_vision.py's counts
    assert (cost.tokens, cost.num_features) == (729, 728)


def test_hand_computed_tiny_clip():
    # d=8, f=16, 2 layers, 2 heads, image 8, patch 4: 4 patches + class token = 5 tokens.
    v = VisionModelConfig("hand", 8, 2, 2, 16, image_size=8, patch_size=4, norm_epsilon=1e-5, kind="clip",
                          hidden_act="quick_gelu")
    cost = vision_encoder_cost(v)
    conv = 2 * 4 * 48 * 8  # 4 patches x [48 -> 8]
    qkvo = 2 * 5 * 8 * 8 * 4  # 5 tokens x four 8x8 projections
    mlp = 2 * 5 * (8 * 16 + 16 * 8)
    core = 2 * 5 * 5 * 8 * 2  # QK^T and AV over 5 x 5, width 8 summed over heads
    assert cost.flops == conv + 2 * (qkvo + mlp + core) == 14_912
    assert cost.attn_core_flops == 2 * core and cost.head_flops == 0
    assert cost.feature_flops == conv + qkvo + mlp + core
    layer = 4 * (64 + 8) + (128 + 16) + (128 + 8) + 4 * 8
    embed = 48 * 8 + 5 * 8 + 8 + 2 * 8  # conv (no bias), positions, class embedding, pre-LN
    assert cost.params == embed + 2 * layer + 2 * 8 == 1_664
    assert cost.feature_params == embed + layer
    assert (cost.tokens, cost.num_features) == (5, 4)


def test_hand_computed_tiny_siglip():
    v = VisionModelConfig("hand", 8, 2, 2, 16, image_size=8, patch_size=4, norm_epsilon=1e-6)
    cost = vision_encoder_cost(v)
    conv = 2 * 4 * 48 * 8
    layer_flops = 2 * 4 * (4 * 64 + 2 * 128) + 2 * 2 * 4 * 4 * 8  # 4 tokens, no class token
    head = 2 * 64 + 2 * 4 * 2 * 64 + 2 * 2 * 4 * 8 + 2 * 64 + 2 * 2 * 8 * 16  # q(1), k/v(4), scores+mix, out, MLP(1)
    assert cost.flops == conv + 2 * layer_flops + head
    assert cost.head_flops == head and (cost.tokens, cost.num_features) == (4, 3)


@pytest.mark.parametrize("name", sorted(TABLE6) + ["clip-vit-l-14-336"])
def test_cli_prints_the_encoder_cost_without_a_language_model(name, capsys):
    assert main(["--vision-model", name, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"vision_model": name, **dataclasses.asdict(vision_encoder_cost(vision_model_preset(name)))}


def test_cli_summary_and_errors(capsys):
    assert main(["--vision-model", "tinyclip-39m"]) == 0
    out = capsys.readouterr().out
    assert "196 x 512" in out and "0.038 B" in out and "15.98" in out
    for argv, needle in (([], "--model is required"), (["--vision-model", "clip-x"], "--vision-model")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert needle in capsys.readouterr().err


def test_cli_with_a_language_model_is_unchanged(capsys):
    assert main(["--model", "tinyllama-1.1b", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["--model", "tinyllama-1.1b", "--vision-model", "siglip-so400m-384", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == default and set(default) == {"params", "flops", "attn_flops",
                                                                               "ffn_flops"}
    # a TinyCLIP tower feeds 196 tokens of width 512 to the decoder
    assert main(["--model", "tinyllama-1.1b", "--vision-model", "tinyclip-39m", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] < default["flops"]


def test_module_entry_point():
    run = subprocess.run([sys.executable, "-m", "himix_megatron.flops", "--vision-model", "tinyclip-40m", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["num_features"] == 49
