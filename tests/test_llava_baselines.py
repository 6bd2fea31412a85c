"""FastV and gamma-MoD inference in the vanilla Hugging Face export (himix_megatron/hf/modeling_llava_baselines.py),
on tiny random LLaVA models built here: R = 0 / a router that routes everything equal transformers' own
LlavaForConditionalGeneration; the kept image tokens are the top ones of layer K-1's attention (transformers' own
eager attention weights) and keep their original positions (a masked reference); the skipped tokens are exactly
those a hand-written MoD layer skips; KV-cached generation equals a cache-free greedy loop; a left-padded batch
equals its samples one by one; the export flags give a trust_remote_code directory that loads and generates."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from himix_megatron.hf import BASELINES_AUTO_MAP, write_baselines_code
from himix_megatron.hf.modeling_llava_baselines import LlavaBaselinesConfig, LlavaBaselinesForConditionalGeneration
from model_utils import randomize

IMG, PAD, VOCAB = 63, 0, 64
N = 15  # (28 / 7)^2 patches, the first dropped ("default" strategy)
LAYERS = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fields(family="llama"):
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=None,
                bos_token_id=None)
    text = Qwen2Config(**text, tie_word_embeddings=True) if family == "qwen2" else LlamaConfig(**text)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=7)
    return dict(text_config=text, vision_config=vision, image_token_index=IMG, image_seq_length=N,
                vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                tie_word_embeddings=family == "qwen2", pad_token_id=PAD, eos_token_id=None)


def _model(family="llama", seed=0, **baselines):
    torch.manual_seed(seed)
    model = LlavaBaselinesForConditionalGeneration(LlavaBaselinesConfig(**_fields(family), **baselines))
    randomize([model], seed, scale=0.3)
    return model.eval()


def _vanilla(model, family="llama"):
    vanilla = LlavaForConditionalGeneration(LlavaConfig(**_fields(family))).eval()
    state = {k: v for k, v in model.state_dict().items() if "mod_router" not in k}
    vanilla.load_state_dict(state)
    return vanilla


def _prompt(prefix: int, text: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(2, IMG, (prefix,), generator=g).tolist(), *[IMG] * N,
            *torch.randint(2, IMG, (text,), generator=g).tolist()]


def _pixels(batch: int, seed: int = 5):
    return torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _generate(model, ids, pixels, steps, mask=None, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                         pixel_values=pixels, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=PAD, suppress_tokens=[IMG], **kwargs)  # as the exports' generation config
    return out[:, ids.shape[1]:]


def _cache_free(model, ids, pixels, steps):
    """Greedy decoding recomputing the whole sequence each step; FastV ranks by the prompt's last token."""
    prompt = ids.shape[1]
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels, use_cache=False, fastv_query_index=prompt - 1).logits
        logits[..., IMG] = -float("inf")
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        ids = torch.cat([ids, token], dim=1)
    return torch.cat(out, dim=1)


def _captured_embeddings(vanilla, ids, pixels):
    """The language model's inputs_embeds (image features in place of the image tokens), as LLaVA builds them."""
    seen = {}
    hook = vanilla.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            vanilla(input_ids=ids, pixel_values=pixels)
    finally:
        hook.remove()
    return seen["embeds"]


def _additive(allowed):
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def _attention_only(layer, h, allowed, positions, lm):
    """One decoder layer's attention half, with an explicit [b, q, k] visibility and RoPE positions."""
    embeddings = lm.rotary_emb(h, position_ids=positions)
    out, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=embeddings,
                             attention_mask=_additive(allowed))
    return h + out


# --- FastV --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fastv_r0_equals_vanilla_llava(family):
    model = _model(family, fastv_k=2, fastv_r=0.0)
    vanilla = _vanilla(model, family)
    ids, mask = _left_padded([_prompt(3, 5, 1), _prompt(1, 4, 2)])
    pixels = _pixels(2)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        theirs = vanilla(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    assert all(len(k) == N for k in model.model.language_model.fastv_last_kept)  # the FastV path ran, keeping all
    assert torch.equal(_generate(model, ids, pixels, 5, mask), _generate(vanilla, ids, pixels, 5, mask))


@pytest.mark.parametrize("ranking", ["last_token", "all_tokens"])
def test_fastv_keeps_the_top_image_tokens_at_their_original_positions(ranking):
    k, r = 2, 0.6
    model = _model(fastv_k=k, fastv_r=r, fastv_ranking=ranking)
    vanilla = _vanilla(model)
    vanilla.set_attn_implementation("eager")
    prompts = [_prompt(4, 6, 3), _prompt(4, 6, 4)]
    ids, pixels = torch.tensor(prompts), _pixels(2, seed=6)
    with torch.no_grad():
        attentions = vanilla(input_ids=ids, pixel_values=pixels, output_attentions=True).attentions
        ours = model(input_ids=ids, pixel_values=pixels).logits
    # Layer K-1's attention, averaged over heads: the last query's row, or the mean over every query.
    weights = attentions[k - 1].mean(1)  # [b, S, S]
    received = weights[:, -1] if ranking == "last_token" else weights.mean(1)
    image = (ids[0] == IMG).nonzero().flatten()
    keep = round(N * (1 - r))
    assert keep == 6
    kept = model.model.language_model.fastv_last_kept
    for b in range(2):
        expected = image[received[b, image].topk(keep).indices].sort().values
        assert torch.equal(kept[b], expected), (b, kept[b], expected)
    assert not torch.equal(kept[0], kept[1])  # per sample
    # Reference: the vanilla layers, layers >= K with the dropped image tokens masked out as keys, every
    # token at its original RoPE position. The kept tokens' logits are FastV's.
    lm, s = vanilla.model.language_model, ids.shape[1]
    h = _captured_embeddings(vanilla, ids, pixels)
    positions = torch.arange(s)[None].expand(2, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    visible = torch.ones(2, s, dtype=torch.bool)
    visible[:, image] = False
    for b in range(2):
        visible[b, kept[b]] = True
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i == k - 1:  # layer K-1's attention by hand (q.k / sqrt(d), RoPE, causal softmax, head mean)
                attn, x, d = layer.self_attn, layer.input_layernorm(h), layer.self_attn.head_dim
                cos, sin = (t[:, None] for t in lm.rotary_emb(h, position_ids=positions))
                rope = lambda t: t * cos + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * sin  # noqa: E731
                query = rope(attn.q_proj(x).view(2, s, -1, d).transpose(1, 2))
                key = rope(attn.k_proj(x).view(2, s, -1, d).transpose(1, 2)).repeat_interleave(2, dim=1)
                scores = (query @ key.transpose(-1, -2) / d ** 0.5).masked_fill(~causal, float("-inf"))
                torch.testing.assert_close(scores.softmax(-1).mean(1), weights, atol=1e-5, rtol=0)
            allowed = causal[None] & (visible[:, None, :] if i >= k else True)
            h = _attention_only(layer, h, allowed, positions, lm)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        reference = vanilla.lm_head(lm.norm(h))
    for b in range(2):
        torch.testing.assert_close(ours[b, visible[b]], reference[b, visible[b]], atol=1e-4, rtol=0)
    with torch.no_grad():  # the pruning really changed the text's logits
        assert (ours[:, -1] - vanilla(input_ids=ids, pixel_values=pixels).logits[:, -1]).abs().max() > 1e-3


def test_fastv_cache_holds_only_the_kept_tokens_in_layers_k_and_later():
    model = _model(fastv_k=2, fastv_r=0.5)
    ids = torch.tensor([_prompt(2, 3, 7)])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=_pixels(1), use_cache=True)
    cache = out.past_key_values
    lengths = [cache.get_seq_length(i) for i in range(LAYERS)]
    s, kept = ids.shape[1], round(N * 0.5)
    assert lengths == [s, s, s - N + kept, s - N + kept]


CONFIGS = {
    "fastv": dict(fastv_k=2, fastv_r=0.5),
    "fastv-all-tokens": dict(fastv_k=1, fastv_r=0.75, fastv_ranking="all_tokens"),
    "mod-mlp": dict(mod_layers=[1, 2], mod_threshold=0.5),
    "mod-layer": dict(mod_layers=[1, 3], mod_threshold=0.5, mod_skip="layer"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_generation_equals_cache_free_and_batched_equals_single(name):
    model = _model(seed=1, **CONFIGS[name])
    prompts = [_prompt(3, 4, 8), _prompt(1, 2, 9)]
    pixels = _pixels(2, seed=7)
    singles = []
    for b, p in enumerate(prompts):
        ids = torch.tensor([p])
        cached = _generate(model, ids, pixels[b:b + 1], 6)
        assert torch.equal(cached, _cache_free(model, ids, pixels[b:b + 1], 6)), (name, b)
        singles.append(cached)
        if name.startswith("mod"):  # the router really skipped some image tokens, and no text token
            with torch.no_grad():
                model(input_ids=ids, pixel_values=pixels[b:b + 1])
            skipped = model.model.language_model.mod_last_skipped
            routable = torch.zeros_like(ids, dtype=torch.bool)
            routable[0, :(ids[0] == IMG).nonzero()[-1] + 1] = True  # the prefix and the image
            assert all(bool((m & ~routable).sum() == 0) for m in skipped.values())
            assert 0 < sum(int(m.sum()) for m in skipped.values()) < len(skipped) * int(routable.sum())
    ids, mask = _left_padded(prompts)
    assert mask[1, 0] == 0  # really padded
    batched = _generate(model, ids, pixels, 6, mask)
    assert torch.equal(batched, torch.cat(singles)), name


def test_fastv_refuses_bad_settings():
    for fields, message in ((dict(fastv_k=0, fastv_r=0.5), "between 1"), (dict(fastv_k=2, fastv_r=1.5), "fraction"),
                            (dict(fastv_k=1, fastv_r=0.5, fastv_ranking="mean"), "fastv_ranking"),
                            (dict(fastv_k=1, fastv_r=0.5, mod_layers=[1]), "not combined"),
                            (dict(mod_layers=[1, 1]), "distinct"), (dict(mod_layers=[1], mod_skip="attn"), "mod_skip")):
        with pytest.raises(ValueError, match=message):
            LlavaBaselinesForConditionalGeneration(LlavaBaselinesConfig(**_fields(), **fields))


# --- gamma-MoD ------------------------------------------------------------------------------------------------


def _set_router(model, p=None):
    """A constant routing probability p for every token (weight 0, bias (0, log(p / (1 - p))))."""
    router = model.model.language_model.mod_router
    with torch.no_grad():
        router.weight.zero_()
        router.bias.copy_(torch.tensor([0.0, 50.0 if p == 1 else -50.0 if p == 0 else math.log(p / (1 - p))]))


@pytest.mark.parametrize("skip", ["mlp", "layer"])
def test_mod_router_routing_everything_equals_vanilla_llava(skip):
    model = _model(mod_layers=[1, 2, 3], mod_skip=skip, mod_router_bias=True)
    _set_router(model, 1)
    vanilla = _vanilla(model)
    ids, pixels = torch.tensor([_prompt(2, 5, 10), _prompt(2, 5, 11)]), _pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits,
                                   vanilla(input_ids=ids, pixel_values=pixels).logits, atol=1e-5, rtol=0)
    assert not any(bool(m.any()) for m in model.model.language_model.mod_last_skipped.values())
    assert torch.equal(_generate(model, ids, pixels, 5), _generate(vanilla, ids, pixels, 5))


def _mod_reference(model, ids, routable, threshold, skip_mode, mod_layers):
    """gamma-MoD by hand on a text-only prompt: per MoD layer p = softmax(router(input_norm(h)))[1]; a routable
    token with p <= threshold skips the MLP ("mlp") or the whole layer ("layer": no query, no key, the others at
    positions renumbered over the tokens the layer processes); the others add p * MLP."""
    lm = model.model.language_model
    b, s = ids.shape
    h = lm.embed_tokens(ids)
    positions = torch.arange(s)[None].expand(b, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None]
    skipped = {}
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i not in mod_layers:
                h = _attention_only(layer, h, causal.expand(b, s, s), positions, lm)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                continue
            p = lm.mod_router(layer.input_layernorm(h)).softmax(-1)[..., 1]
            skip = routable & (p <= threshold)
            skipped[i] = skip
            if skip_mode == "layer":
                keys = ~skip
                renumbered = (keys.long().cumsum(1) - 1).clamp(min=0)
                after = _attention_only(layer, h, causal & keys[:, None, :], renumbered, lm)
            else:
                after = _attention_only(layer, h, causal.expand(b, s, s), positions, lm)
            mlp = after + p[..., None] * layer.mlp(layer.post_attention_layernorm(after))
            h = torch.where(skip[..., None], after if skip_mode == "mlp" else h, mlp)
        return model.lm_head(lm.norm(h)), skipped


@pytest.mark.parametrize("skip", ["mlp", "layer"])
def test_mod_skips_exactly_the_hand_chosen_tokens(skip):
    layers = [1, 2]
    model = _model(mod_layers=layers, mod_threshold=0.5, mod_skip=skip, mod_router_bias=True)
    ids = torch.randint(2, IMG, (2, 12), generator=torch.Generator().manual_seed(12))  # text only
    chosen = torch.zeros(2, 12, dtype=torch.bool)
    chosen[0, [2, 3, 7]] = True
    chosen[1, [0, 5, 6, 10]] = True
    # A constant p = 0.3 < 0.5: exactly the routable (hand-chosen) tokens skip; the others add 0.3 * MLP.
    _set_router(model, 0.3)
    with torch.no_grad():
        ours = model(input_ids=ids, mod_routable_mask=chosen).logits
    assert all(torch.equal(model.model.language_model.mod_last_skipped[i], chosen) for i in layers)
    reference, _ = _mod_reference(model, ids, chosen, 0.5, skip, layers)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    with torch.no_grad():  # nothing routable: nothing skipped, whatever p
        model(input_ids=ids)
    assert not any(bool(m.any()) for m in model.model.language_model.mod_last_skipped.values())
    # A random router: the skipped set is the routable tokens whose own p (by hand) is at or below the threshold.
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        model.model.language_model.mod_router.weight.copy_(torch.randn(2, 32, generator=g))
        ours = model(input_ids=ids, mod_routable_mask=chosen).logits
    reference, expected = _mod_reference(model, ids, chosen, 0.5, skip, layers)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    for i in layers:
        assert torch.equal(model.model.language_model.mod_last_skipped[i], expected[i])
    assert 0 < sum(int(m.sum()) for m in expected.values()) < 2 * int(chosen.sum())


def test_mod_never_skips_text_tokens():
    model = _model(mod_layers=[0, 2], mod_threshold=0.5, mod_router_bias=True)
    _set_router(model, 0)  # p ~ 0 for every token
    ids = torch.tensor([_prompt(3, 4, 14)])
    image = ids == IMG
    before = torch.zeros_like(image)
    before[0, :int(image[0].nonzero()[0])] = True
    lm = model.model.language_model
    for prefix, routable in ((True, image | before), (False, image)):
        lm._baselines = dataclasses.replace(lm._baselines, mod_route_prefix=prefix)
        with torch.no_grad():
            model(input_ids=ids, pixel_values=_pixels(1))
        assert all(torch.equal(m, routable) for m in lm.mod_last_skipped.values()), prefix
    # Generation: the prefill skips exactly the routable tokens, every later step skips none.
    seen = []
    hook = lm.register_forward_hook(lambda *_: seen.append({i: m.clone() for i, m in lm.mod_last_skipped.items()}))
    try:
        _generate(model, ids, _pixels(1), 4)
    finally:
        hook.remove()
    assert len(seen) == 4 and all(torch.equal(m, image) for m in seen[0].values())
    assert all(not bool(m.any()) for step in seen[1:] for m in step.values())
    # The official decode rule (mod_decode_threshold 0.5): a new token with p < 0.5 skips.
    lm._baselines = dataclasses.replace(lm._baselines, mod_decode_threshold=0.5)
    seen.clear()
    hook = lm.register_forward_hook(lambda *_: seen.append({i: m.clone() for i, m in lm.mod_last_skipped.items()}))
    try:
        _generate(model, ids, _pixels(1), 3)
    finally:
        hook.remove()
    assert all(bool(m.all()) for step in seen[1:] for m in step.values())


# --- remote code and the export ------------------------------------------------------------------------------


def test_remote_code_directory_loads_with_auto_classes(tmp_path):
    model = _model(mod_layers=[1, 2], mod_threshold=0.5, mod_skip="layer", mod_router_bias=True)
    model.config.auto_map = write_baselines_code(tmp_path)
    assert model.config.auto_map == BASELINES_AUTO_MAP
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info
    assert type(loaded).__name__ == "LlavaBaselinesForConditionalGeneration"
    assert loaded.config.model_type == "llava_baselines" and loaded.config.mod_skip == "layer"
    ids, pixels = torch.tensor([_prompt(2, 3, 15)]), _pixels(1)
    assert torch.equal(_generate(loaded, ids, pixels, 4), _generate(model, ids, pixels, 4))
    with pytest.raises(ValueError, match="trust_remote_code"):  # not silently the plain LLaVA model
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)


@pytest.fixture(scope="module")
def vanilla_checkpoint(tmp_path_factory, single_rank):
    from himix_megatron.checkpoint import ModelDescription, build_model, save_checkpoint
    from himix_megatron.config import ParallelConfig
    from himix_megatron.data.synthetic import write_word_tokenizer
    from model_utils import TINY_LM, TINY_VISION

    root = tmp_path_factory.mktemp("baselines")
    tok = str(root / "tok")
    write_word_tokenizer(tok)
    description = ModelDescription("vanilla", TINY_LM, TINY_VISION, "tinyllama")
    chunks, encoder = build_model(description, ParallelConfig())
    randomize(chunks + [encoder], 0, scale=0.5)
    path = str(root / "ckpt")
    save_checkpoint(path, chunks, description, iteration=1, encoder=encoder, tokenizer_dir=tok)
    return root, path


def test_export_flags_give_a_fastv_directory_that_loads_and_generates(vanilla_checkpoint):
    from himix_megatron.eval import generate

    root, ckpt = vanilla_checkpoint
    plain, fastv, refused = str(root / "plain"), str(root / "fastv"), str(root / "refused")
    # The CLI (in a process of its own, as a user runs it): a plain export, a FastV one, and bad flags refused
    # before anything is written.
    script = f"""import sys
sys.path.insert(0, 'tools')
from convert_checkpoint import main
assert main(['export', '--load', {ckpt!r}, '--output', {plain!r}]) == 0
assert main(['export', '--load', {ckpt!r}, '--output', {fastv!r}, '--fastv-k', '2', '--fastv-r', '0',
             '--fastv-ranking', 'all_tokens']) == 0
try:
    main(['export', '--load', {ckpt!r}, '--output', {refused!r}, '--fastv-k', '2'])
    raise AssertionError('--fastv-k without --fastv-r was accepted')
except SystemExit as e:
    assert e.code == 2
assert main(['export', '--load', {ckpt!r}, '--output', {refused!r}, '--fastv-k', '9', '--fastv-r', '0.5']) == 1
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fastv_k=9" in run.stderr and not os.path.exists(refused)
    config = json.load(open(os.path.join(fastv, "config.json")))
    assert config["model_type"] == "llava_baselines" and config["auto_map"] == BASELINES_AUTO_MAP
    assert (config["fastv_k"], config["fastv_r"], config["fastv_ranking"]) == (2, 0.0, "all_tokens")
    assert config["himix_template"] == "tinyllama"
    model, info = AutoModelForCausalLM.from_pretrained(fastv, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info
    reference = LlavaForConditionalGeneration.from_pretrained(plain).eval()
    image_id, n = config["image_token_index"], config["image_seq_length"]
    ids = torch.tensor([[1, 5, 6, *[image_id] * n, 7, 8, 9]])
    pixels = _pixels(1, seed=9).repeat_interleave(2, -1).repeat_interleave(2, -2)  # 56 px
    with torch.no_grad():  # R = 0: every weight where the plain export has it
        torch.testing.assert_close(model.eval()(input_ids=ids, pixel_values=pixels).logits,
                                   reference(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=0)
    pruned = AutoModelForCausalLM.from_pretrained(fastv, trust_remote_code=True, fastv_r=0.5).eval()
    assert _generate(pruned, ids, pixels, 3).shape == (1, 3)
    assert [len(k) for k in pruned.model.language_model.fastv_last_kept] == [round(n * 0.5)]
    assert type(AutoProcessor.from_pretrained(fastv)).__name__ == "LlavaProcessor"  # no remote code needed
    m = generate.load_model(fastv, template=None, system_prompt="", log=lambda _: None)
    assert m.arch == "vanilla" and type(m.model).__name__ == "LlavaBaselinesForConditionalGeneration"
    assert m.image_tokens == n
