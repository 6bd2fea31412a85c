"""The Hugging Face HiMix model (himix_megatron/hf): parity with transformers' Llama / Qwen2 without an image,
with an independent reference of the mixture attention with one, the trust_remote_code export contract, and
cached generation."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from himix_megatron.hf import AUTO_MAP, TESTED_TRANSFORMERS, write_remote_code
from himix_megatron.hf.configuration_himix import HiMixConfig
from himix_megatron.hf.modeling_himix import HiMixForCausalLM

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=14)
NUM_PATCHES = (56 // 14) ** 2


def tiny_config(**overrides) -> HiMixConfig:
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
                  vision_config=dict(VISION), pad_token_id=0, eos_token_id=None)
    return HiMixConfig(**{**kwargs, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere, norms and (zero-initialised) biases included, so naming mistakes show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def himix_model(seed: int = 0, **overrides) -> HiMixForCausalLM:
    torch.manual_seed(seed)
    return randomize(HiMixForCausalLM(tiny_config(**overrides)), seed)


# --- 1. no image: exactly the base LM ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_text_only_matches_transformers(family):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5)
    if family == "llama":  # Llama-3 RoPE scaling, untied head
        theta, scaling, tied, bias = 500000.0, LLAMA3_ROPE, False, False
        base = LlamaForCausalLM(LlamaConfig(**common, rope_parameters={**LLAMA3_ROPE, "rope_theta": theta}))
    else:  # q/k/v biases, tied embeddings
        theta, scaling, tied, bias = 1e6, None, True, True
        base = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "default", "rope_theta": theta}))
    randomize(base)
    model = HiMixForCausalLM(tiny_config(**{**common, "rope_theta": theta, "rope_scaling": scaling,
                                            "tie_word_embeddings": tied, "attention_bias": bias})).eval()
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all("vision" in k for k in result.missing_keys)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight

    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: positions come from the mask's cumsum, as in Llama
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)
        ours, theirs = model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)


# --- 2. with an image: an independent reference of the mixture attention ------------------------------------------


def reference_logits(model: HiMixForCausalLM, ids: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
    """Per DESIGN §1, written from scratch: [K_v; K_t], RoPE on text only, one softmax under an explicit
    [M, N+M] bottom-right causal mask. Default RoPE, no padding."""
    cfg, w = model.config, {k: v for k, v in model.named_parameters()}
    hd, nh, nkv, eps = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    (b, m), n = ids.shape, xv.shape[1]

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def lin(x, name):
        return x @ w[name + ".weight"].T + (w[name + ".bias"] if name + ".bias" in w else 0)

    angle = torch.arange(m).float()[:, None] / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    cos, sin = angle.cos(), angle.sin()

    def rope(x):  # x [b, h, m, hd], rotating the pairs (i, i + hd/2)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    allowed = torch.cat([torch.ones(m, n, dtype=torch.bool), torch.tril(torch.ones(m, m, dtype=torch.bool))], dim=1)
    h = w["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        heads = lambda t: t.view(b, -1, t.shape[-1] // hd, hd).transpose(1, 2)  # noqa: E731
        q = rope(heads(lin(x, p + "self_attn.q_proj")))
        k = rope(heads(lin(x, p + "self_attn.k_proj")))
        v = heads(lin(x, p + "self_attn.v_proj"))
        xn = rms(xv, w[p + "self_attn.vision_norm.weight"])
        k = torch.cat([heads(lin(xn, p + "self_attn.vision_k_proj")), k], dim=2).repeat_interleave(nh // nkv, dim=1)
        v = torch.cat([heads(lin(xn, p + "self_attn.vision_v_proj")), v], dim=2).repeat_interleave(nh // nkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / hd**0.5
        attn = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
        h = h + lin(attn.transpose(1, 2).reshape(b, m, -1), p + "self_attn.o_proj")
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        gate, up = lin(x, p + "mlp.gate_proj"), lin(x, p + "mlp.up_proj")
        h = h + lin(gate * torch.sigmoid(gate) * up, p + "mlp.down_proj")
    return rms(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("bias", [False, True])
def test_image_matches_reference(bias):
    model = himix_model(attention_bias=bias)
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    xv = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids, vision_features=xv).logits
        torch.testing.assert_close(logits, reference_logits(model, ids, xv), atol=1e-5, rtol=0)
        assert (logits - model(ids).logits).abs().max() > 1e-2  # the image does reach the text

        # Left padding masks text keys only: every vision key stays visible to the padded row.
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, :4] = 0
        padded = torch.cat([torch.zeros(2, 4, dtype=torch.long), ids], dim=1)
        padded_logits = model(padded, attention_mask=mask, vision_features=xv).logits
    torch.testing.assert_close(padded_logits[1, 4:], logits[1], atol=1e-5, rtol=0)


def test_pixel_values_path_equals_vision_features():
    model = himix_model()
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hidden = model.vision_tower.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        features = hidden[-2][:, 1:]  # penultimate layer, no post-layernorm, first patch dropped
        assert features.shape == (2, NUM_PATCHES - 1, 48)
        torch.testing.assert_close(model.get_vision_features(pixels), features, atol=0, rtol=0)
        torch.testing.assert_close(model(ids, pixel_values=pixels).logits,
                                   model(ids, vision_features=features).logits, atol=1e-6, rtol=0)


def test_image_placeholder_is_stripped():
    model = himix_model(image_token_index=255)
    ids = torch.randint(1, 200, (2, 10), generator=torch.Generator().manual_seed(6))
    with_placeholder = torch.cat([torch.full((2, 1), 255), ids], dim=1)
    xv = torch.randn(2, 5, 48)
    labels = torch.cat([torch.full((2, 1), -100), ids], dim=1)
    with torch.no_grad():
        out = model(with_placeholder, vision_features=xv, labels=labels)
        logits = model(ids, vision_features=xv).logits
    torch.testing.assert_close(out.logits, logits, atol=0, rtol=0)
    # Labels cover text only and are shifted inside: token t+1 is predicted at t.
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


# --- 3. the export contract: AutoModelForCausalLM + trust_remote_code ----------------------------------------------


def test_remote_code_roundtrip(tmp_path):
    from safetensors import safe_open

    model = himix_model(attention_bias=True)
    model.config.auto_map = write_remote_code(tmp_path)
    assert model.config.auto_map == AUTO_MAP
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == AUTO_MAP
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.layers.1.self_attn.vision_norm.weight", "model.layers.1.self_attn.vision_k_proj.bias",
            "model.layers.0.self_attn.vision_v_proj.weight", "lm_head.weight",
            "vision_tower.vision_model.embeddings.patch_embedding.weight"} <= names

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "HiMixForCausalLM" and type(loaded) is not HiMixForCausalLM
    ids = torch.randint(1, 256, (1, 9))
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits,
                                   atol=0, rtol=0)


def test_tested_transformers_range_is_the_one_everywhere():
    """TESTED_TRANSFORMERS (written into every export, read by `make test-hf-matrix`) agrees with setup.py's lower
    bound and with the Install details of docs/gpu-and-containers.md."""
    import re
    from pathlib import Path

    from packaging.version import Version

    match = re.fullmatch(r">=([0-9.]+),<=([0-9.]+)", TESTED_TRANSFORMERS)  # the form the Makefile's sed reads
    assert match, TESTED_TRANSFORMERS
    oldest, newest = map(Version, match.groups())
    assert oldest < newest
    root = Path(__file__).resolve().parent.parent
    requirement = re.search(r'"transformers>=([0-9.]+),<([0-9.]+)"', (root / "setup.py").read_text())
    assert requirement and Version(requirement[1]) == oldest and newest < Version(requirement[2])
    page = (root / "docs" / "gpu-and-containers.md").read_text()
    install = page.split("## Install details", 1)[1].split("\n## ", 1)[0]
    assert f"`{TESTED_TRANSFORMERS}`" in install
    # The exact versions the section quotes are those of the lock file.
    lock = set((root / "requirements" / "lock-cpu.txt").read_text().split())
    quoted = re.findall(r"`([a-z0-9-]+==[^`]+)`", install)
    assert len(quoted) >= 7 and set(quoted) <= lock, set(quoted) - lock


# --- 4. cached generation ------------------------------------------------------------------------------------------


def greedy_without_cache(model, ids, mask, steps, **vision):
    scores = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, use_cache=False, **vision).logits[:, -1]
        scores.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(scores, dim=1)


def test_generate_with_cache_matches_full_recompute():
    model = himix_model(num_hidden_layers=3)
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(7))
    ids[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(8))

    calls = []
    tower_forward = model.vision_tower.forward
    model.vision_tower.forward = lambda *a, **k: calls.append(1) or tower_forward(*a, **k)
    out = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8, do_sample=False,
                         use_cache=True, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    assert len(calls) == 1  # the image is encoded at prefill only; decode steps read vision K/V from the cache
    model.vision_tower.forward = tower_forward

    expected, expected_scores = greedy_without_cache(model, ids, mask, 8, pixel_values=pixels)
    assert out.sequences.shape == (2, 17)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(torch.stack(out.scores, dim=1), expected_scores, atol=1e-5, rtol=0)

    features = model.get_vision_features(pixels).detach()
    again = model.generate(ids, attention_mask=mask, vision_features=features, max_new_tokens=8, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(again, expected)
    text_only = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(text_only, greedy_without_cache(model, ids, mask, 8)[0])


# --- 5. errors -----------------------------------------------------------------------------------------------------


def test_clear_errors():
    model = himix_model()
    ids = torch.randint(1, 256, (1, 5))
    with pytest.raises(ValueError, match=r"vision_features.*48"):
        model(ids, vision_features=torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="pixel_values.*vision_features"):
        model(ids, pixel_values=torch.randn(1, 3, 56, 56), vision_features=torch.randn(1, 4, 48))
    with pytest.raises(ValueError, match="vision_hidden_size"):
        tiny_config(vision_hidden_size=32)
