"""gamma-MoD on the vanilla model: masked routing and its capacity, a MoD layer against a hand computation (the
MLP output scaled by the router probability, attention among the routed tokens only), the aux loss, inference
by threshold, a training step, TP=2 = TP=1, PP=2 = PP=1, the trainer end to end with checkpoints, the flag
refusals, the FLOPs, and the ARank tool on hand-made attention maps."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from himix_megatron.config import ConfigError, ParallelConfig
from model_utils import TINY_LM, TINY_VISION, build_tiny, gather_tp, global_names, load_shards
from model_utils import tiny_batch as _tiny_batch


def tiny_batch(**kwargs):
    """Vanilla's text holds the image id, here after a 3-token "system header" (the prefix tests route)."""
    return _tiny_batch(image_slot=3, **kwargs)
from multiprocess import run_world
from reference_himix import rms_norm, rope

MOD = dict(gamma_mod=True, mod_layers=(1, 2))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arank_tool():
    spec = importlib.util.spec_from_file_location("arank_tool", os.path.join(REPO, "tools", "arank.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mod_model(parallel=ParallelConfig(), seed=0, **overrides):
    model = build_tiny("vanilla", parallel, seed=seed, **{**MOD, **overrides})
    with torch.no_grad():  # norms away from 1, and a router whose probabilities spread over (0, 1)
        g = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
        model.mod_router.weight.normal_(0, 0.5, generator=g)
    return model


# --- routing -------------------------------------------------------------------------------------------------


def test_masked_routing_keeps_every_text_token_and_exactly_the_capacity():
    from himix_megatron.model.gamma_mod import routed_tokens

    p = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.2, 0.6, 0.01, 0.3],  # sample 0
                      [0.4, 0.4, 0.8, 0.1, 0.9, 0.05, 0.2, 0.6]]).T  # sample 1; [S=8, b=2]
    routable = torch.zeros(8, 2, dtype=torch.bool)
    routable[:5, 0] = True  # sample 0: 5 routable (image + system), 3 text
    routable[:4, 1] = True  # sample 1: 4 routable
    chosen = routed_tokens(p, routable, training=True, capacity=0.5, threshold=0.005)
    # Sample 0: ceil(5 * 0.5) = 3 of positions 0..4 by p (0.9, 0.7, 0.5 -> 0, 3, 2); text 5, 6, 7 always,
    # even position 6 with p = 0.01. Sample 1: ceil(4 * 0.5) = 2 of 0..3: p 0.8 (2), then a tie 0.4 / 0.4:
    # the earlier position (0).
    assert chosen[:, 0].nonzero().flatten().tolist() == [0, 2, 3, 5, 6, 7]
    assert chosen[:, 1].nonzero().flatten().tolist() == [0, 2, 4, 5, 6, 7]
    assert bool(chosen[~routable].all())  # no question / answer token is ever skipped
    # Other capacities: ceil(R x c) routable tokens, exact at products that are integers.
    for capacity, kept in ((0.34, (2, 2)), (0.2, (1, 1)), (0.6, (3, 3)), (1.0, (5, 4))):
        chosen = routed_tokens(p, routable, training=True, capacity=capacity, threshold=0.005)
        assert tuple((chosen & routable).sum(0).tolist()) == kept, capacity
        assert bool(chosen[~routable].all())
    assert routed_tokens(torch.full((10, 1), 0.5), torch.ones(10, 1, dtype=torch.bool), training=True,
                         capacity=0.3, threshold=0.0).sum() == 3  # 10 x 0.3 = 3 exactly, not 4
    # Inference: p > threshold, no mask (the official forward_inference), text tokens included.
    chosen = routed_tokens(p, routable, training=False, capacity=0.5, threshold=0.25)
    assert chosen.T.tolist() == (p.T > 0.25).tolist()
    assert not bool(chosen[6, 0])  # a text token below the threshold is skipped at inference


def test_routable_span_is_the_image_and_the_system_header(tmp_path):
    from himix_megatron.data import load_tokenizer
    from himix_megatron.data.records import Conversation
    from himix_megatron.data.synthetic import write_word_tokenizer
    from himix_megatron.data.templates import IMAGE_TOKEN_INDEX, TemplateConfig, encode_conversation
    from himix_megatron.model.gamma_mod import routable_mask, system_header_ids, system_prefix_lengths

    tok = load_tokenizer(write_word_tokenizer(str(tmp_path)))
    header = system_header_ids(tok, "tinyllama", "")
    assert header == tuple(tok.encode_chunk("USER: ")[0])  # "<s>USER: " with an empty system prompt
    sample = encode_conversation(Conversation(rounds=(("what", "red"),), has_image=True), tok,
                                 TemplateConfig("tinyllama", image="mark", system="")).ids
    h = len(header)
    assert tuple(sample[:h]) == header and sample[h] == IMAGE_TOKEN_INDEX  # the image follows the header
    # Sample 1 does not start with the header and holds its image id later; sample 2 has no image.
    ids = torch.tensor([sample[:h + 3], [tok.bos_id, 9, 9, 9, IMAGE_TOKEN_INDEX, 9][:h + 3], [tok.bos_id] + [9] * (h + 2)])
    lengths = system_prefix_lengths(ids, header)
    assert lengths.tolist() == [h, 0, 0]
    n, m = 4, h + 3
    mask = routable_mask(ids, n, lengths)
    assert mask.tolist() == [[True] * (h + n) + [False] * (m - h),  # the header, then the image
                             [False] * 4 + [True] * n + [False] * (m - 4),  # the image where its id was
                             [False] * (n + m)]


# --- one MoD layer by hand -------------------------------------------------------------------------------------


def _hand_mod_layer(w, prefix, router, h, routable, *, training, capacity=0.5, threshold=0.005, skip="layer"):
    """One sample h [S, d] through a MoD layer, from the weights: (output [S, d], logits [S, 2], routed list).
    skip="layer": attention among the routed tokens at positions 0..k-1; "mlp": attention over all tokens."""
    lm = TINY_LM
    heads, groups, hn, eps = lm.num_attention_heads, lm.num_query_groups, lm.kv_channels, lm.norm_epsilon
    per_group = heads // groups
    x = rms_norm(h, w[prefix + "input_layernorm.weight"], eps)
    logits = x @ router.T
    p = logits.softmax(-1)[:, 1]
    s = h.shape[0]
    if training:
        candidates = [i for i in range(s) if routable[i]]
        keep = math.ceil(len(candidates) * capacity)
        best = sorted(candidates, key=lambda i: (-float(p[i]), i))[:keep]
        routed = sorted([i for i in range(s) if not routable[i]] + best)
    else:
        routed = [i for i in range(s) if p[i] > threshold]
    attended = routed if skip == "layer" else list(range(s))
    k = len(attended)
    xs, hs = x[attended], h[attended]
    qkv = (xs @ w[prefix + "self_attention.linear_qkv.weight"].T).view(k, groups, per_group + 2, hn)
    outs = []
    for head in range(heads):
        g = head // per_group
        q = rope(qkv[:, g, head % per_group], lm.rotary_base)  # positions 0..k-1: renumbered
        key = rope(qkv[:, g, per_group], lm.rotary_base)
        scores = (q @ key.T / math.sqrt(hn)).masked_fill(torch.ones(k, k, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(scores.softmax(-1) @ qkv[:, g, per_group + 1])
    out = h.clone()
    out[attended] = hs + torch.cat(outs, -1) @ w[prefix + "self_attention.linear_proj.weight"].T
    h2 = out[routed]
    y = rms_norm(h2, w[prefix + "pre_mlp_layernorm.weight"], eps)
    gate, up = (y @ w[prefix + "mlp.linear_fc1.weight"].T).chunk(2, -1)
    mlp = (F.silu(gate) * up) @ w[prefix + "mlp.linear_fc2.weight"].T
    out[routed] = h2 + p[routed][:, None] * mlp  # the MLP output scaled by the router probability
    return out, logits, routed


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("skip", ["layer", "mlp"])
def test_mod_layer_training_matches_hand_computation_and_aux_loss(skip):
    model = _mod_model(mod_skip=skip).train()
    layer = model.decoder.layers[1]
    assert layer.is_mod and not model.decoder.layers[0].is_mod and model.decoder.layers[2].is_mod
    s, b, d = 12, 2, TINY_LM.hidden_size
    h = torch.randn(s, b, d, generator=torch.Generator().manual_seed(3))
    routable = torch.zeros(b, s, dtype=torch.bool)
    routable[0, :7] = True  # 7 routable -> 4 routed of them
    routable[1, :4] = True  # 4 routable -> 2
    w = {n: p.detach() for n, p in model.named_parameters()}
    router = w["mod_router.weight"]
    model.mod_router._aux.clear()
    with torch.no_grad():
        out, _ = layer(hidden_states=h, attention_mask=None, context_mask=routable,
                       rotary_pos_emb=model.rotary_pos_emb(s))
    aux_terms = []
    for i in range(b):
        expected, logits, routed = _hand_mod_layer(w, "decoder.layers.1.", router, h[:, i], routable[i], training=True,
                                                   skip=skip)
        torch.testing.assert_close(out[:, i], expected, atol=1e-5, rtol=1e-5)
        skipped = [j for j in range(s) if j not in routed]
        assert len(skipped) == routable[i].sum() - math.ceil(routable[i].sum() * 0.5)
        if skip == "layer":
            assert torch.equal(out[skipped, i], h[skipped, i])  # skipped tokens pass through unchanged
        assert all(j in routed for j in range(s) if not routable[i, j])
        target = torch.zeros(s, dtype=torch.long)
        target[routed] = 1
        aux_terms.append(-logits.log_softmax(-1).gather(1, target[:, None]).sum())
    assert layer.last_routed.tolist() == [12 - 3, 12 - 2]
    # Aux loss: 0.01 x the router's cross entropy against "routed", averaged over every position.
    [aux] = model.mod_router._aux
    torch.testing.assert_close(aux, 0.01 * torch.stack(aux_terms).sum() / (s * b), atol=1e-7, rtol=1e-5)


@pytest.mark.usefixtures("single_rank")
def test_inference_routes_by_threshold_without_mask():
    model = _mod_model(mod_threshold=0.4).eval()
    layer = model.decoder.layers[2]
    s, b = 10, 2
    h = torch.randn(s, b, TINY_LM.hidden_size, generator=torch.Generator().manual_seed(5))
    w = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        out, _ = layer(hidden_states=h, attention_mask=None, context_mask=torch.ones(b, s, dtype=torch.bool),
                       rotary_pos_emb=model.rotary_pos_emb(s))
        counts = []
        for i in range(b):
            expected, _, routed = _hand_mod_layer(w, "decoder.layers.2.", w["mod_router.weight"], h[:, i],
                                                  None, training=False, threshold=0.4)
            torch.testing.assert_close(out[:, i], expected, atol=1e-5, rtol=1e-5)
            counts.append(len(routed))
    assert layer.last_routed.tolist() == counts and 0 < min(counts) and max(counts) < s  # some skipped, differing
    # The whole model in eval mode: no aux loss, logits of the text.
    model.mod_router._aux.clear()
    tokens, positions, vision, _ = tiny_batch()
    with torch.no_grad():
        logits = model(tokens, positions, vision)
    assert logits.shape == (2, tokens.shape[1], model.vocab_size) and not model.mod_router._aux


@pytest.mark.usefixtures("single_rank")
def test_model_routes_image_and_system_tokens_only():
    model = _mod_model().train()
    tokens, positions, vision, labels = tiny_batch()
    n = vision.shape[0]
    loss = model(tokens, positions, vision, labels=labels, mod_routable_text=torch.tensor([3, 0]))
    # Routable: 15 image tokens + 3 (sample 0) / + 0 (sample 1); ceil(half) of them routed, every text token.
    expected = [8 - 3 + math.ceil((n + 3) / 2), 8 + math.ceil(n / 2)]
    for layer in model.decoder.layers:
        if layer.is_mod:
            assert layer.last_routed.tolist() == expected
    loss.sum().backward()
    assert model.mod_router.weight.grad.abs().sum() > 0
    # A batch where sample 1 has no image: its text never sees the (placeholder) image block, also inside the
    # MoD layers, whose attention masks are gathered from the model's: changing that image changes nothing.
    present = torch.tensor([True, False])
    tokens = tokens.clone()
    tokens[1, 3] = 7  # sample 1 holds no image id
    other = vision.clone()
    other[:, 1] = torch.randn(other[:, 1].shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        routable_text = torch.tensor([3, 0])
        a = model(tokens, positions, vision, labels=labels, image_present=present, mod_routable_text=routable_text)
        b = model(tokens, positions, other, labels=labels, image_present=present, mod_routable_text=routable_text)
        alone = model(tokens[1:], positions[1:], None, labels=labels[1:], mod_routable_text=routable_text[1:])
    torch.testing.assert_close(a[1], alone[0], atol=1e-5, rtol=0)  # as if it were a text-only batch
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=0)
    assert not torch.allclose(a[1], loss[1].detach())  # and it differs from seeing the image


@pytest.mark.usefixtures("single_rank")
def test_full_activation_recompute_routes_and_trains_the_same():
    """The routing mask travels in the block's context_mask, which megatron's recompute passes again: recompute
    gives the same loss and gradients, and the aux loss is counted once per layer."""
    tokens, positions, vision, labels = tiny_batch()
    results = []
    for recompute in ({}, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)):
        model = _mod_model(**recompute).train()
        model.mod_router.aux_grad_scale = 3.0
        loss = model(tokens, positions, vision, labels=labels, mod_routable_text=torch.tensor([3, 1]))
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        [float(a) for a in model.mod_router._aux]))
    (loss, grads, aux), (loss_r, grads_r, aux_r) = results
    torch.testing.assert_close(loss_r, loss, atol=1e-6, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert len(aux) == len(aux_r) == 2 and aux_r == pytest.approx(aux)


def test_attach_aux_injects_the_aux_gradient():
    from himix_megatron.model.gamma_mod import _AttachAux

    x = torch.randn(3, requires_grad=True)
    theta = torch.tensor(2.0, requires_grad=True)
    out = _AttachAux.apply(x * 1.0, theta ** 2, 0.25)
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]
    assert float(theta.grad) == 0.25 * 2 * 2.0  # scale x d(theta^2)/d theta


# --- a training step -----------------------------------------------------------------------------------------


def _microbatches(count=2, seed=100, images=True):
    from himix_megatron.parallel.pipeline import MicroBatch

    out = []
    for k in range(count):
        tokens, positions, vision, labels = tiny_batch(seed=seed + k)
        loss_mask = torch.ones_like(labels, dtype=torch.float)
        loss_mask[:, : 2 + k] = 0
        out.append(MicroBatch(tokens, positions, labels, loss_mask, images=vision if images else None))
    return out


@pytest.mark.usefixtures("single_rank")
def test_training_step_trains_the_router_with_the_aux_loss_weighted_per_micro_batch():
    from himix_megatron.model import gamma_mod
    from himix_megatron.parallel.pipeline import forward_backward

    model = _mod_model(calculate_per_token_loss=True)
    mbs = _microbatches()
    model.config.mod_system_prefix = tuple(mbs[0].tokens[0, :2].tolist())  # sample 0 of mb 0 has a "system" prefix
    stats = forward_backward([model], mbs, lambda images: images, vision_tokens=TINY_VISION.num_features)
    assert stats.shape == (2, 2) and torch.isfinite(stats).all()
    label_tokens = sum(float(mb.loss_mask.sum()) for mb in mbs)
    assert model.mod_router.aux_grad_scale == pytest.approx(label_tokens / 2)  # T / micro-batches: mean over them
    grad = model.mod_router.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    aux = gamma_mod.pop_aux_loss([model])  # 2 MoD layers x 2 micro-batches, each 0.01 x CE ~ 0.01 x log 2
    assert 0.5 * 4 * 0.01 * math.log(2) < aux < 2 * 4 * 0.01 * math.log(2)
    # Without the aux loss, the router still trains through the scaled MLP outputs, differently.
    model.zero_grad()
    model.config.mod_aux_loss_coeff = 0.0
    try:
        forward_backward([model], mbs, lambda images: images, vision_tokens=TINY_VISION.num_features)
    finally:
        model.config.mod_aux_loss_coeff = 0.01
    assert model.mod_router.weight.grad.abs().sum() > 0 and not torch.allclose(model.mod_router.weight.grad, grad)


@pytest.mark.usefixtures("single_rank")
def test_router_checkpoint_key_and_loading_a_dense_checkpoint():
    from himix_megatron.model.gamma_mod import checkpoint_record, config_overrides, router_absent

    model = _mod_model()
    state = model.sharded_state_dict()
    assert state["mod_router.weight"].replica_id == (0, 0, 0)
    assert "mod_router.bias" not in state  # the official router has no bias
    with router_absent([model]):
        assert not [k for k in model.sharded_state_dict() if "mod_router" in k]
        dense = {k: v for k, v in model.state_dict().items() if "mod_router" not in k}
        before = model.mod_router.weight.detach().clone()
        model.load_state_dict(dense, strict=True)  # a dense vanilla checkpoint: the router keeps its init
        assert torch.equal(model.mod_router.weight, before)
    biased = _mod_model(mod_router_bias=True)
    assert set(k for k, _ in biased.named_parameters() if "mod_router" in k) == {"mod_router.weight",
                                                                                 "mod_router.bias"}
    record = checkpoint_record(model.config)
    assert record == {"mod_layers": [1, 2], "mod_capacity": 0.5, "mod_aux_loss_coeff": 0.01, "mod_threshold": 0.005,
                      "mod_decode_threshold": 0.5, "mod_router_bias": False, "mod_skip": "layer"}
    assert json.loads(json.dumps(record)) == record
    assert config_overrides(record)["mod_layers"] == (1, 2)


# --- refusals ------------------------------------------------------------------------------------------------


def test_config_refusals():
    from himix_megatron.config import build_transformer_config, default_mod_layers

    assert default_mod_layers(32) == tuple(range(3, 31))
    with pytest.raises(ConfigError, match="arch='vanilla'"):
        build_transformer_config(TINY_LM, TINY_VISION, arch="himix", gamma_mod=True, mod_layers=(1,))
    with pytest.raises(ConfigError, match="mod_layers.*no MoD layer by default"):
        build_transformer_config(TINY_LM, TINY_VISION, arch="vanilla", gamma_mod=True)
    with pytest.raises(ConfigError, match=r"mod_layers=\[4\]"):
        build_transformer_config(TINY_LM, TINY_VISION, arch="vanilla", gamma_mod=True, mod_layers=(4,))
    with pytest.raises(ConfigError, match="mod_capacity"):
        build_transformer_config(TINY_LM, TINY_VISION, arch="vanilla", gamma_mod=True, mod_layers=(1,),
                                 mod_capacity=0.0)


def test_flag_refusals(tmp_path):
    from himix_megatron.training.config import check, gamma_mod_settings, parse_args

    (tmp_path / "a").mkdir()
    base = ["--data-path", str(tmp_path / "a"), "--train-iters", "1"]

    def refused(argv, needle, world=1):
        with pytest.raises(ConfigError, match=needle):
            check(parse_args(base + argv), world, te_available=False, cuda=False)

    cfg = parse_args(base + ["--arch", "vanilla", "--gamma-mod", "--mod-layers", "3,4,5", "--mod-capacity", "0.34",
                             "--mod-aux-loss-coeff", "0.02", "--mod-threshold", "0.01", "--mod-skip", "mlp"])
    check(cfg, 1, te_available=False, cuda=False)
    settings = gamma_mod_settings(cfg, "vanilla", 8, None)
    assert settings == {"gamma_mod": True, "mod_layers": (3, 4, 5), "mod_capacity": 0.34, "mod_aux_loss_coeff": 0.02,
                        "mod_threshold": 0.01, "mod_skip": "mlp"}
    refused(["--arch", "vanilla", "--mod-layers", "3"], "--mod-layers needs --gamma-mod")
    refused(["--arch", "vanilla", "--mod-router-bias"], "--mod-router-bias needs --gamma-mod")
    refused(["--arch", "vanilla", "--mod-aux-loss-coeff", "0"], "--mod-aux-loss-coeff needs --gamma-mod")
    refused(["--gamma-mod"], "--gamma-mod needs --arch vanilla")
    refused(["--arch", "himix", "--gamma-mod"], "--gamma-mod needs --arch vanilla")
    refused(["--arch", "vanilla", "--gamma-mod", "--stage", "pretrain"], "finetune stage")
    refused(["--arch", "vanilla", "--gamma-mod", "--packing-seq-length", "2048"], "--packing-seq-length")
    refused(["--arch", "vanilla", "--gamma-mod", "--sequence-parallel", "--tensor-model-parallel-size", "2"],
            "--sequence-parallel", world=2)
    refused(["--arch", "vanilla", "--gamma-mod", "--mod-capacity", "1.5"], "--mod-capacity 1.5")
    refused(["--arch", "vanilla", "--gamma-mod", "--mod-layers", "3,x"], "--mod-layers")
    # Once the checkpoint (or the preset) is known:
    with pytest.raises(ConfigError, match="--mod-layers '3,9': the model has layers 0..7"):
        gamma_mod_settings(parse_args(base + ["--arch", "vanilla", "--gamma-mod", "--mod-layers", "3,9"]),
                           "vanilla", 8, None)
    with pytest.raises(ConfigError, match="no default MoD layer"):
        gamma_mod_settings(parse_args(base + ["--arch", "vanilla", "--gamma-mod"]), "vanilla", 4, None)
    loaded = parse_args(base + ["--gamma-mod", "--load", str(tmp_path)])
    with pytest.raises(ConfigError, match="holds arch himix"):
        gamma_mod_settings(loaded, "himix", 8, None)
    with pytest.raises(ConfigError, match="--mod-threshold needs --gamma-mod"):  # a dense checkpoint
        gamma_mod_settings(parse_args(base + ["--load", str(tmp_path), "--mod-threshold", "0.1"]), "vanilla", 8, None)
    # A gamma-MoD checkpoint's record applies without --gamma-mod; flags override it.
    record = {"mod_layers": [3, 4], "mod_capacity": 0.5, "mod_aux_loss_coeff": 0.01, "mod_threshold": 0.005,
              "mod_decode_threshold": 0.5, "mod_router_bias": False, "mod_skip": "layer"}
    settings = gamma_mod_settings(parse_args(base + ["--load", str(tmp_path), "--mod-threshold", "0.1"]),
                                  "vanilla", 8, record)
    assert settings["mod_layers"] == (3, 4) and settings["mod_threshold"] == 0.1 and settings["gamma_mod"]


# --- FLOPs ---------------------------------------------------------------------------------------------------


def test_gamma_mod_flops(capsys):
    from himix_megatron.config import LanguageModelConfig, language_model_preset
    from himix_megatron.flops import decoder_cost, gamma_mod_cost, gamma_mod_training_flops, main

    lm = LanguageModelConfig("hand", 4, 4, 2, 1, 6, 10, 64, 1e4, 1e-5, False, False)  # d 4, 2 heads of 2, kv 2
    d, q, kv, ffn = 4, 4, 2, 6
    dense = decoder_cost(lm, "vanilla", 3, 2, vision_hidden_size=4)
    # N = 3 image + 1 system token routable: ceil(4 x 0.5) = 2 of them + the other 1 text token -> k = 3 of 5.
    cost = gamma_mod_cost(lm, 3, 2, mod_layers=(1, 2), capacity=0.5, system_tokens=1)

    def layer(t, s):  # one layer's attention and FFN FLOPs at t query tokens over s keys
        return 2 * t * d * (q + 2 * kv) + 2 * t * q * d + 2 * 2 * t * s * q, 2 * t * 3 * d * ffn

    (a5, f5), (a3, f3) = layer(5, 5), layer(3, 3)
    router = 2 * 5 * d * 2
    assert cost.attn_flops == 2 * a5 + 2 * a3
    assert cost.ffn_flops == 2 * f5 + 2 * (f3 + router)
    assert cost.flops == cost.attn_flops + cost.ffn_flops + 2 * 5 * d * 10  # the head at every position
    assert cost.params == dense.params + 2 * d
    # Capacity 1: MoD layers process everything, the router is the only extra.
    full = gamma_mod_cost(lm, 3, 2, mod_layers=(0, 1, 2, 3), capacity=1.0)
    assert full.flops == dense.flops + 4 * router
    mlp_only = gamma_mod_cost(lm, 3, 2, mod_layers=(1, 2), capacity=0.5, system_tokens=1, skip="mlp")
    assert mlp_only.attn_flops == dense.attn_flops and mlp_only.ffn_flops == cost.ffn_flops
    assert gamma_mod_training_flops(lm, 3, 2, "finetune", mod_layers=(1, 2), system_tokens=1) == 3 * cost.flops
    with pytest.raises(ConfigError, match="mod_layers"):
        gamma_mod_cost(lm, 3, 2, mod_layers=(4,))
    vicuna = language_model_preset("vicuna-7b")
    assert main(["--model", "vicuna-7b", "--arch", "gamma-mod", "--mod-system-tokens", "35", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] == gamma_mod_cost(vicuna, 728, 64, system_tokens=35).flops
    assert main(["--model", "vicuna-7b", "--arch", "gamma-mod", "--mod-layers", "3,4", "--mod-capacity", "0.34"]) == 0
    assert "gamma-mod capacity=0.34" in capsys.readouterr().out


# --- ARank ---------------------------------------------------------------------------------------------------


def test_arank_on_hand_made_attention_maps():
    arank = _arank_tool()
    s = 6
    only_self = torch.eye(s)  # lower triangle without the diagonal is zero: rank 0
    first = torch.zeros(s, s)
    first[:, 0] = 1.0  # everyone attends token 0: one non-zero column below the diagonal, rank 1
    uniform = torch.tril(torch.ones(s, s)) / torch.arange(1, s + 1)[:, None]  # causal mean: staircase, rank 5
    maps = torch.stack([only_self, first, uniform])
    assert arank.attention_rank(maps[0:1]) == 0
    assert arank.attention_rank(maps[1:2]) == 1
    assert arank.attention_rank(maps[2:3]) == s - 1
    assert arank.attention_rank(maps) == pytest.approx((0 + 1 + 5) / 3)  # official: mean of the heads' ranks
    assert arank.attention_rank(maps, head_reduce="map") == s - 1  # rank of the head-averaged map
    # torch.linalg.matrix_rank's default tolerance, sigma_max x S x eps(float32): noise below it is no rank.
    noisy = first.clone()
    noisy[1:, 1] = 1e-9
    assert arank.attention_rank(noisy[None]) == 1
    noisy[1:, 1] = torch.arange(1, s) * 1e-3
    assert arank.attention_rank(noisy[None]) == 2
    assert arank.choose_mod_layers([5.0, 2.0, 2.0, 9.0, 1.0], 2) == [2, 4]  # lowest; ties: the later layer
    assert arank.choose_mod_layers([5.0, 2.0, 2.0, 9.0, 1.0], 3) == [1, 2, 4]
    table = arank.report({"aranks": [5.0, 2.0, 2.0, 9.0, 1.0], "samples": 4, "head_reduce": "ranks", "mod_count": 2,
                          "mod_layers": [2, 4]})
    assert "--mod-layers 2,4" in table and table.count("<- MoD") == 2


@pytest.mark.usefixtures("single_rank")
def test_arank_recorder_sees_the_attention_the_layers_compute():
    arank = _arank_tool()
    model = build_tiny("vanilla").eval()
    tokens, positions, vision, _ = tiny_batch()
    recorder = arank.AttentionRanks(model)
    outputs = {}
    hooks = [layer.self_attention.core_attention.register_forward_hook(
        lambda m, args, out, i=i: outputs.__setitem__(i, (args[2], out))) for i, layer in
        enumerate(model.decoder.layers)]
    with torch.no_grad():
        model(tokens, positions, vision)
    recorder.remove()
    for h in hooks:
        h.remove()
    s = vision.shape[0] + tokens.shape[1]
    for i, maps in recorder.maps.items():  # the maps times V reproduce the core attention's output
        value, out = outputs[i]
        heads, groups = TINY_LM.num_attention_heads, TINY_LM.num_query_groups
        v = value.repeat_interleave(heads // groups, dim=2)  # [S, b, heads, hn]
        mixed = torch.einsum("bhqk,kbhd->qbhd", maps, v).reshape(s, 2, -1)
        torch.testing.assert_close(mixed, out, atol=1e-5, rtol=1e-5)
    assert len(recorder.mean()) == TINY_LM.num_layers
    assert all(0 < r <= s for r in recorder.mean())
    # The tool's recorder leaves out vanilla's spare last position (the image id, moved behind the sequence):
    # the maps of the spliced sequence itself, which no position of it changes.
    spliced = arank.AttentionRanks(model, spare=1)
    with torch.no_grad():
        model(tokens, positions, vision)
    spliced.remove()
    for i, maps in spliced.maps.items():
        torch.testing.assert_close(maps, recorder.maps[i][..., :-1, :-1], atol=1e-6, rtol=0)


# --- TP and PP (multi-process) ---------------------------------------------------------------------------------


ROUTABLE_TEXT = torch.tensor([3, 1])


def _reference_step(weights=None):
    """Single rank: the TP reference (one forward/backward) and the PP reference (forward_backward)."""
    from himix_megatron.parallel.pipeline import forward_backward

    model = _mod_model(calculate_per_token_loss=True).train()
    tokens, positions, vision, labels = tiny_batch()
    loss = model(tokens, positions, vision, labels=labels, mod_routable_text=ROUTABLE_TEXT)
    loss.sum().backward()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tp = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    mbs = _microbatches(4)
    model.config.mod_system_prefix = tuple(mbs[0].tokens[0, :2].tolist())
    sums = forward_backward([model], mbs, lambda images: images, vision_tokens=TINY_VISION.num_features)
    pp = (sums[:, 0] / sums[:, 1], {n: p.grad.clone() for n, p in model.named_parameters()})
    return weights, tp, pp


def _tp_step(parallel, weights):
    model = build_tiny("vanilla", parallel, seed=123, calculate_per_token_loss=True, **MOD).train()
    load_shards(model, weights)
    tokens, positions, vision, labels = tiny_batch()
    loss = model(tokens, positions, vision, labels=labels, mod_routable_text=ROUTABLE_TEXT)
    loss.sum().backward()
    return loss.detach(), {n: gather_tp(n, p.grad, p) for n, p in model.named_parameters()}


def _pp_step(parallel, weights, checkpoint_dir):
    from megatron.core import parallel_state, tensor_parallel

    from himix_megatron.config import build_transformer_config
    from himix_megatron.model import model_class
    from himix_megatron.parallel.pipeline import build_model_chunks, forward_backward

    tensor_parallel.model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)
    mbs = _microbatches(4)
    config = build_transformer_config(TINY_LM, TINY_VISION, parallel, arch="vanilla", use_cpu_initialization=True,
                                      calculate_per_token_loss=True,
                                      mod_system_prefix=tuple(mbs[0].tokens[0, :2].tolist()), **MOD)
    chunks = build_model_chunks(model_class("vanilla"), config, TINY_LM)
    with torch.no_grad():
        for chunk in chunks:
            for full_name, param in global_names(chunk).values():
                param.copy_(weights[full_name])
    sums = forward_backward(chunks, mbs, lambda images: images, vision_tokens=TINY_VISION.num_features)
    grads = {full: p.grad.clone() for chunk in chunks for full, p in global_names(chunk).values()}
    # Checkpoint: one main replica of the router among the copies (dist_checkpointing refuses two), and
    # loading gives every copy the saved tensor.
    from megatron.core import dist_checkpointing

    from himix_megatron.checkpoint import _model_state, _unwrap

    saved = chunks[0].mod_router.weight.detach().clone()
    dist_checkpointing.save(_model_state(chunks, None), checkpoint_dir)
    with torch.no_grad():
        for chunk in chunks:
            chunk.mod_router.weight.zero_()
    restored = dist_checkpointing.load(_model_state(chunks, None), checkpoint_dir)
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(restored[f"model{i}" if len(chunks) > 1 else "model"])
    reloaded = all(torch.equal(c.mod_router.weight, saved) for c in chunks)
    return (sums[:, 0] / sums[:, 1] if sums is not None else None), grads, \
        parallel_state.get_pipeline_model_parallel_rank(), len(chunks), reloaded


@pytest.mark.slow
def test_tp2_and_pp2_match_a_single_rank(tmp_path):
    """TP=2 against one forward/backward; PP=2 (interleaved, 2 model chunks per stage: 4 router copies, MoD layers
    1 and 2 on different stages) against forward_backward over the same 4 micro-batches."""
    [(weights, (ref_loss, ref_grads), (ref_losses, ref_pp_grads))] = run_world(1, ParallelConfig(), _reference_step)
    assert ref_grads["mod_router.weight"].abs().sum() > 0
    tp = ParallelConfig(tensor_model_parallel_size=2)
    for loss, grads in run_world(2, tp, _tp_step, tp, weights):
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-4, msg=f"TP=2 gradient of {name}")
    pp = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    (tmp_path / "ckpt").mkdir()
    seen = set()
    for losses, grads, stage, chunks, reloaded in run_world(2, pp, _pp_step, pp, weights, str(tmp_path / "ckpt")):
        assert chunks == 2 and reloaded
        if stage == 1:
            torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=0)
        # Each stage's router copy has the gradient of the whole model (both stages' MoD layers).
        torch.testing.assert_close(grads["mod_router.weight"], ref_pp_grads["mod_router.weight"], atol=1e-6,
                                   rtol=1e-4)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_pp_grads[name], atol=1e-5, rtol=1e-4, msg=f"PP=2 gradient of {name}")
            seen.add(name)
    assert seen == set(ref_pp_grads)


# --- the trainer end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from data_utils import synthetic_training_data

    return synthetic_training_data(tmp_path_factory.mktemp("gamma_mod_data"), 200, maxcount=100)


def _train_runs(root: str, save: str):
    """A dense vanilla finetune; gamma-MoD finetuning from it (weights only, fresh router), stopped after 2 of 3
    iterations and resumed (no gamma-MoD flag: the checkpoint says it); the same 3 iterations uninterrupted."""
    import dataclasses

    from himix_megatron.checkpoint import read_metadata
    from himix_megatron.training.config import TrainConfig
    from himix_megatron.training.trainer import train

    base = TrainConfig(arch="vanilla", data_path=[os.path.join(root, "train")],
                       tokenizer_model=os.path.join(root, "tok"), system_prompt="", seq_length=24, micro_batch_size=2, global_batch_size=4, lr=3e-3,
                       train_iters=3, num_workers=0, progress=False, log_interval=1,
                       pipeline_model_parallel_size=torch.distributed.get_world_size())
    dense_dir, mod_dir = os.path.join(save, "dense"), os.path.join(save, "mod")
    dense = train(dataclasses.replace(base, train_iters=2, save=dense_dir))
    mod = dataclasses.replace(base, gamma_mod=True, mod_layers="1,2", finetune=True, load=dense_dir)
    straight = train(mod)
    first = train(dataclasses.replace(mod, save=mod_dir, exit_interval=2))
    resumed = train(dataclasses.replace(base, load=mod_dir, save=mod_dir, mod_threshold=0.01))
    return dense, straight, first, resumed, read_metadata(mod_dir)


@pytest.mark.slow
@pytest.mark.usefixtures("single_rank")
def test_trainer_finetunes_gamma_mod_from_a_dense_checkpoint_and_resumes_exactly(synthetic, tmp_path):
    """At PP=2 (router copies on both stages, megatron DDP's gradient buffers); then tools/arank.py at PP=1 on the
    dense checkpoint, in this process."""
    pp = ParallelConfig(pipeline_model_parallel_size=2)
    dense, straight, first, resumed, meta = run_world(2, pp, _train_runs, str(synthetic), str(tmp_path))[0]
    assert all("mod_aux_loss" not in h for h in dense["history"])
    assert all(0 < h["mod_aux_loss"] < 0.1 and math.isfinite(h["loss"]) for h in straight["history"])
    assert meta["train_state"]["gamma_mod"] == {"mod_layers": [1, 2], "mod_capacity": 0.5, "mod_aux_loss_coeff": 0.01,
                                                "mod_threshold": 0.01, "mod_decode_threshold": 0.5,
                                                "mod_router_bias": False, "mod_skip": "layer"}
    # The router, its optimizer state and the rest came back: iteration 3 equals the uninterrupted run's.
    assert [h["iteration"] for h in first["history"]] == [1, 2] and [h["iteration"] for h in resumed["history"]] == [3]
    for key in ("loss", "mod_aux_loss", "grad_norm"):
        assert resumed["history"][0][key] == pytest.approx(straight["history"][2][key], rel=1e-5, abs=1e-7), key
    # tools/arank.py on the dense checkpoint: one ARank per layer over 3 samples, the 2 lowest chosen.
    arank = _arank_tool()
    ranks = arank.run(arank.build_parser().parse_args([
        "--load", str(tmp_path / "dense"), "--data-path", str(synthetic / "train"), "--num-samples", "3",
        "--mod-count", "2", "--system-prompt", ""]))
    assert ranks["samples"] == 3 and len(ranks["aranks"]) == 4 and all(r > 0 for r in ranks["aranks"])
    assert ranks["mod_layers"] == _arank_tool().choose_mod_layers(ranks["aranks"], 2)
