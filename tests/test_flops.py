"""FLOPs / parameter accounting against the paper's Tables 3, 5, 8, 10, and against hand counts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from himix_megatron.config import ARCHS, ConfigError, LanguageModelConfig, language_model_preset
from himix_megatron.flops import decoder_cost, fastv_cost, main, training_flops

REPO = Path(__file__).resolve().parents[1]
TOL = 0.04
N = 728
TEXT = (32, 64, 200, 728, 1000)

# Paper Table 5, GFLOPs of the language decoder: (vanilla row, HiMix row) over TEXT.
TABLE5 = {
    "qwen2-0.5b": ((801, 837, 991, 1620, 1970), (44, 78, 224, 821, 1150)),
    "tinyllama-1.1b": ((1680, 1750, 2080, 3400, 4120), (92, 161, 466, 1720, 2400)),
    "llama3.2-1b": ((1950, 2040, 2410, 3880, 4660), (110, 192, 546, 1970, 2730)),
    "llama3.2-3b": ((5080, 5310, 6260, 10090, 12130), (310, 525, 1450, 5140, 7120)),
}
# Paper Table 10: (F_Attn, F_FFN) in GFLOPs, same layout.
TABLE10 = {
    "qwen2-0.5b": (
        ((117, 476), (124, 497), (156, 582), (311, 914), (410, 1085)),
        ((15, 19), (20, 40), (44, 126), (166, 457), (248, 628)),
    ),
    "tinyllama-1.1b": (
        ((420, 1157), (442, 1206), (541, 1413), (988, 2217), (1258, 2631)),
        ((37, 49), (55, 97), (136, 304), (513, 1109), (747, 1523)),
    ),
    "llama3.2-1b": (
        ((331, 1224), (348, 1276), (425, 1495), (768, 2345), (973, 2783)),
        ((41, 50), (56, 103), (119, 322), (411, 1173), (590, 1611)),
    ),
    "llama3.2-3b": (
        ((1270, 3213), (1333, 3349), (1605, 3924), (2783, 6156), (3465, 7306)),
        ((148, 131), (204, 270), (442, 846), (1488, 3078), (2101, 4228)),
    ),
}

# This one cell contradicts the paper's own neighbour: the MLP is per token, so F_FFN(M=32) is exactly
# half of F_FFN(M=64). The paper prints 40 at M=64, i.e. >= 39.5, so M=32 must be >= 19.75 and would
# print as 20, not 19. The architecture (d=896, ffn=4864, 24 layers) gives 20.08 against 40.16.
INCONSISTENT = {("qwen2-0.5b", "himix", 32, "ffn")}


def _cells(table, parts):
    for model, rows in table.items():
        for arch, row in zip(("vanilla", "himix"), rows):
            for m, ref in zip(TEXT, row):
                for part, value in zip(parts, ref if isinstance(ref, tuple) else (ref,)):
                    marks = []
                    if (model, arch, m, part) in INCONSISTENT:
                        marks = [pytest.mark.xfail(strict=True, reason="paper cell inconsistent with M=64")]
                    yield pytest.param(model, arch, m, part, value, marks=marks, id=f"{model}-{arch}-{N}:{m}-{part}")


def _rel(ours: int, paper_gflops: float) -> float:
    return abs(ours / 1e9 / paper_gflops - 1)


@pytest.mark.parametrize("model,arch,m,part,paper", list(_cells(TABLE5, ("total",))))
def test_table5_total(model, arch, m, part, paper):
    assert _rel(decoder_cost(language_model_preset(model), arch, N, m).flops, paper) < TOL


@pytest.mark.parametrize("model,arch,m,part,paper", list(_cells(TABLE10, ("attn", "ffn"))))
def test_table10_split(model, arch, m, part, paper):
    cost = decoder_cost(language_model_preset(model), arch, N, m)
    assert _rel(cost.attn_flops if part == "attn" else cost.ffn_flops, paper) < TOL


@pytest.mark.parametrize("arch,paper", [("vanilla", 10800), ("himix", 1310)])
def test_table8_vicuna(arch, paper):
    assert _rel(decoder_cost(language_model_preset("vicuna-7b"), arch, N, 64).flops, paper) < TOL


def test_ffn_is_linear_in_text_tokens():
    # The argument behind INCONSISTENT.
    lm = language_model_preset("qwen2-0.5b")
    assert 2 * decoder_cost(lm, "himix", N, 32).ffn_flops == decoder_cost(lm, "himix", N, 64).ffn_flops


@pytest.mark.parametrize(
    "model,vanilla,himix,digits",
    [
        ("llama3.2-1b", 1.236, 1.255, 3),
        ("vicuna-7b", 6.74, 7.04, 2),
        ("qwen2-0.5b", 0.49, 0.50, 2),
        ("tinyllama-1.1b", 1.10, 1.11, 2),
        ("llama3.2-3b", 3.21, 3.28, 2),
    ],
)
def test_params(model, vanilla, himix, digits):
    lm = language_model_preset(model)
    assert round(decoder_cost(lm, "vanilla", N, 64).params / 1e9, digits) == vanilla
    assert round(decoder_cost(lm, "himix", N, 64).params / 1e9, digits) == himix


# --- the formula itself, on a config small enough to count by hand -------------------------------------
# d=8, 2 heads of 4, 1 KV group (kv_dim 4), SwiGLU 16, vocab 10, untied, no bias; d_v=4, N=3, M=2.
def _hand_lm(layers=1, qkv_bias=False):
    return LanguageModelConfig("hand", 8, layers, 2, 1, 16, 10, 64, 1e4, 1e-5, False, qkv_bias)


def _flops(*matmuls):
    """2 x MACs of (rows, inner, cols) matmuls."""
    return 2 * sum(r * k * c for r, k, c in matmuls)


def _ffn(s):
    return _flops((s, 8, 16), (s, 8, 16), (s, 16, 8))


def test_hand_vanilla():
    s = 5  # 3 vision + 2 text tokens, one sequence
    attn = _flops((s, 8, 8), (s, 8, 4), (s, 8, 4), (s, 8, 8)) + 2 * _flops((s, 4, s), (s, s, 4))  # 2 heads
    cost = decoder_cost(_hand_lm(), "vanilla", 3, 2, vision_hidden_size=4)
    assert (cost.attn_flops, cost.ffn_flops) == (attn, _ffn(s))
    assert cost.flops == attn + _ffn(s) + _flops((s, 8, 10))
    assert cost.params == 10 * 8 * 2 + (8 + 8 + 64 + 32 + 32 + 64 + 3 * 8 * 16) + 8
    assert (cost.connector_params, cost.connector_flops) == (4 * 8 + 8 + 8 * 8 + 8, _flops((3, 4, 8), (3, 8, 8)))


def test_hand_himix():
    text = _flops((2, 8, 8), (2, 8, 4), (2, 8, 4), (2, 8, 8))
    vision = _flops((3, 4, 4), (3, 4, 4))  # W_K,v and W_V,v on raw d_v=4 features
    core = 2 * _flops((2, 4, 5), (2, 5, 4))  # 2 text queries x 5 keys, per head; no causal discount
    cost = decoder_cost(_hand_lm(), "himix", 3, 2, vision_hidden_size=4)
    assert (cost.attn_flops, cost.ffn_flops) == (text + vision + core, _ffn(2))
    assert cost.flops == text + vision + core + _ffn(2) + _flops((2, 8, 10))
    base = decoder_cost(_hand_lm(), "vanilla", 3, 2, vision_hidden_size=4).params
    assert cost.params == base + 4 + 2 * 4 * 4
    assert cost.connector_params == cost.connector_flops == 0
    # Qwen2-style bias: +16 on the text QKV, +8 on the vision K/V.
    biased = decoder_cost(_hand_lm(qkv_bias=True), "himix", 3, 2, vision_hidden_size=4).params
    assert biased == cost.params + 16 + 8


@pytest.mark.parametrize("arch,connectors", [("uniform", 1), ("hierarchical", 2)])
def test_hand_injection_variants(arch, connectors):
    # Connector outputs (width d=8) go through the layer's own text K/V projections.
    lm = _hand_lm(layers=2)
    vision = _flops((3, 8, 4), (3, 8, 4))
    text = _flops((2, 8, 8), (2, 8, 4), (2, 8, 4), (2, 8, 8))
    core = 2 * _flops((2, 4, 5), (2, 5, 4))
    cost = decoder_cost(lm, arch, 3, 2, vision_hidden_size=4)
    assert cost.attn_flops == 2 * (text + vision + core)
    assert cost.params == decoder_cost(lm, "vanilla", 3, 2, vision_hidden_size=4).params
    assert cost.connector_flops == connectors * _flops((3, 4, 8), (3, 8, 8))


# --- training FLOPs ---------------------------------------------------------------------------------------
def test_hand_training_himix():
    lm = _hand_lm(layers=2)
    fwd = decoder_cost(lm, "himix", 3, 2, vision_hidden_size=4).flops
    text_qkv = _flops((2, 8, 8), (2, 8, 4), (2, 8, 4))
    out = _flops((2, 8, 8))
    vision = _flops((3, 4, 4), (3, 4, 4))
    core = 2 * _flops((2, 4, 5), (2, 5, 4))
    head = _flops((2, 8, 10))
    layer1 = text_qkv + out + vision + _ffn(2) + 2 * core  # every input gradient, both operands of QK^T/AV
    # Layer 0 only down to its vision K/V: dP = dO V^T over all 5 keys; dK, dV for the 3 vision keys.
    layer0 = _ffn(2) + out + vision + 2 * _flops((2, 4, 5)) + 2 * _flops((3, 2, 4), (3, 2, 4))
    weight_grads = 2 * vision
    assert training_flops(lm, "himix", 3, 2, "pretrain", 4) == fwd + head + layer1 + layer0 + weight_grads
    for stage in ("finetune", "further-pretrain"):
        assert training_flops(lm, "himix", 3, 2, stage, 4) == 3 * fwd


def test_hand_training_vanilla_pretrain():
    lm = _hand_lm(layers=2)
    cost = decoder_cost(lm, "vanilla", 3, 2, vision_hidden_size=4)
    core = 2 * 2 * _flops((5, 4, 5), (5, 5, 4))  # 2 layers x 2 heads
    assert training_flops(lm, "vanilla", 3, 2, "pretrain", 4) == 2 * cost.flops + core


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("model", ["qwen2-0.5b", "llama3.2-1b", "vicuna-7b"])
def test_pretrain_cheaper_than_finetune(model, arch):
    lm = language_model_preset(model)
    fwd = decoder_cost(lm, arch, N, 64).flops
    pretrain, finetune = (training_flops(lm, arch, N, 64, s) for s in ("pretrain", "finetune"))
    assert 2 * fwd < pretrain < finetune == 3 * fwd


def test_bad_inputs():
    lm = language_model_preset("tiny")
    with pytest.raises(ValueError, match="arch"):
        decoder_cost(lm, "llava", 1, 1)
    with pytest.raises(ValueError, match="text_tokens"):
        decoder_cost(lm, "himix", 1, -1)
    with pytest.raises(ValueError, match="stage"):
        training_flops(lm, "himix", 1, 1, "sft")


# --- CLI ---------------------------------------------------------------------------------------------------
def test_cli_json():
    args = ["--model", "llama3.2-1b", "--arch", "himix", "--vision-tokens", "728", "--text-tokens", "64", "--json"]
    run = subprocess.run(
        [sys.executable, "-m", "himix_megatron.flops", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    cost = decoder_cost(language_model_preset("llama3.2-1b"), "himix", 728, 64)
    assert got == {k: getattr(cost, k) for k in ("params", "flops", "attn_flops", "ffn_flops")}


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "gpt-17"], "gpt-17"),
        (["--model", "tiny", "--vision-model", "clip-x"], "--vision-model"),
        (["--model", "tiny", "--arch", "llava"], "--arch"),
        (["--model", "tiny", "--vision-tokens", "-1"], "--vision-tokens"),
        (["--model", "tiny", "--text-tokens", "-5"], "--text-tokens"),
    ],
)
def test_cli_errors(argv, needle, capsys):
    # Same argparse path as the command line (parser.error -> exit 2); in-process to keep the suite fast.
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    assert needle in capsys.readouterr().err


def test_cli_summary(capsys):
    assert main(["--model", "qwen2-0.5b", "--arch", "hierarchical"]) == 0
    out = capsys.readouterr().out
    assert "728 vision + 64 text" in out and "GFLOPs" in out and "connector" in out


# --- FastV (issue 14): Table 9, Llama-3.2-1B at 728:64 ------------------------------------------------------
TABLE9_FASTV = {(2, 0.9): 510, (2, 0.75): 758, (2, 0.5): 1180, (3, 0.9): 595, (3, 0.75): 829, (3, 0.5): 1230,
                (5, 0.9): 765, (5, 0.5): 1320}


@pytest.mark.parametrize("k,r", sorted(TABLE9_FASTV))
def test_table9_fastv(k, r):
    cost = fastv_cost(language_model_preset("llama3.2-1b"), 728, 64, k, r)
    assert cost.flops / 1e9 == pytest.approx(TABLE9_FASTV[k, r], rel=0.01)


def test_fastv_by_hand():
    lm = _hand_lm(layers=2)
    # R=0 prunes nothing: vanilla exactly. K=L keeps every token in every layer: vanilla too.
    for k, r in ((1, 0.0), (lm.num_layers, 0.7)):
        assert fastv_cost(lm, 3, 2, k, r).flops == decoder_cost(lm, "vanilla", 3, 2, vision_hidden_size=4).flops
    # K=0, R=2/3: every layer sees round(3 * 1/3) = 1 image token, the head runs at 1 + 2 positions.
    assert fastv_cost(lm, 3, 2, 0, 2 / 3).flops == decoder_cost(lm, "vanilla", 1, 2, vision_hidden_size=4).flops
    with pytest.raises(ConfigError, match="fastv_k=9"):
        fastv_cost(lm, 3, 2, 9, 0.5)
    with pytest.raises(ConfigError, match="fastv_r=1.5"):
        fastv_cost(lm, 3, 2, 1, 1.5)


def test_cli_fastv(capsys):
    assert main(["--model", "llama3.2-1b", "--arch", "fastv", "--fastv-k", "3", "--fastv-r", "0.75", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] == fastv_cost(language_model_preset("llama3.2-1b"), 728, 64,
                                                                       3, 0.75).flops
