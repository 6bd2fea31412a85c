"""FastV on the megatron vanilla model: R = 0 is the vanilla model; the kept image tokens are the top-k of the
last query's head-averaged attention in layer K-1, computed here by hand from the weights, with the image where
its id sits in the text (after two text tokens here); pruned layers see exactly the text and the kept image
tokens at their original positions; TP = 2 equals TP = 1."""

from __future__ import annotations

import pytest
import torch

from himix_megatron.config import ParallelConfig
from himix_megatron.model.fastv import FastVConfig, fastv_logits
from model_utils import TINY_LM, TINY_VISION, build_tiny, tiny_batch
from multiprocess import run_world
from reference_himix import rms_norm, rope


def _model_and_batch(parallel=ParallelConfig(), seed=0):
    model = build_tiny("vanilla", parallel, seed=seed).eval()
    with torch.no_grad():  # norms away from 1 so that a missed norm cannot hide
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(7)))
    tokens, _, vision, _ = tiny_batch(batch=2, text_len=6, image_slot=SLOT)
    return model, tokens, vision[:10]  # 10 image tokens keep the hand computation small


SLOT = 2  # the image id's place in the text: `<s> USER: <image> ...`


@pytest.mark.usefixtures("single_rank")
def test_r0_is_the_vanilla_model():
    model, tokens, vision = _model_and_batch()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        vanilla = model(tokens, positions, vision)
    logits, kept = fastv_logits(model, tokens, vision, FastVConfig(k=2, r=0.0))
    torch.testing.assert_close(logits, vanilla, atol=1e-5, rtol=1e-5)
    assert kept.tolist() == [list(range(10))] * 2


def _hand_ranking(model, tokens, vision, k):
    """The last query's attention over the image tokens in layer k-1, averaged over heads, from the weights."""
    lm = TINY_LM
    heads, groups, hn = lm.num_attention_heads, lm.num_query_groups, lm.kv_channels
    w = {n: p.detach() for n, p in model.named_parameters()}
    fc1, fc2 = "vision_projection.encoder.linear_fc1", "vision_projection.encoder.linear_fc2"
    image = torch.nn.functional.gelu(vision @ w[fc1 + ".weight"].T + w[fc1 + ".bias"]) @ w[fc2 + ".weight"].T \
        + w[fc2 + ".bias"]  # [N, b, d]
    text = w["embedding.word_embeddings.weight"][tokens.clamp(min=0)].transpose(0, 1)
    hidden = torch.cat([text[:SLOT], image, text[SLOT + 1:]], 0)  # [S, b, d]: the image spliced at its id
    with torch.no_grad():
        for layer in model.decoder.layers[: k - 1]:
            hidden, _ = layer(hidden_states=hidden, attention_mask=None,
                              rotary_pos_emb=model.rotary_pos_emb(hidden.shape[0]))
    p = f"decoder.layers.{k - 1}.self_attention.linear_qkv."
    ranking = []
    for b in range(tokens.shape[0]):
        x = rms_norm(hidden[:, b], w[f"decoder.layers.{k - 1}.input_layernorm.weight"], lm.norm_epsilon)
        qkv = (x @ w[p + "weight"].T).view(x.shape[0], groups, heads // groups + 2, hn)
        q = qkv[:, :, :-2].reshape(x.shape[0], heads, hn)
        key = qkv[:, :, -2]
        per_head = []
        for h in range(heads):
            qh, kh = rope(q[:, h], lm.rotary_base), rope(key[:, h // (heads // groups)], lm.rotary_base)
            per_head.append(torch.softmax(qh[-1] @ kh.T / hn ** 0.5, -1))
        ranking.append(torch.stack(per_head).mean(0)[SLOT:SLOT + vision.shape[0]])
    return torch.stack(ranking)  # [b, N]


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("k", [1, 2])
def test_kept_tokens_are_the_top_k_of_the_last_query_attention(k):
    model, tokens, vision = _model_and_batch()
    cfg = FastVConfig(k=k, r=0.7)  # keep round(10 * 0.3) = 3
    logits, kept = fastv_logits(model, tokens, vision, cfg)
    expected = _hand_ranking(model, tokens, vision, k).topk(3, dim=-1).indices.sort(-1).values
    assert kept.tolist() == expected.tolist()
    # Layers >= K see exactly the text and the kept image tokens, each at its original position; a pruned
    # token's output is its state entering layer K (the image id's output is the last image token's).
    n, m = vision.shape[0], tokens.shape[1]
    s = n + m - 1
    at = [t + (n - 1) * (t >= SLOT) for t in range(m)]
    for b in range(tokens.shape[0]):
        keep = torch.cat([torch.arange(SLOT), SLOT + kept[b], torch.arange(SLOT + n, s)])
        with torch.no_grad():
            text = model.embedding(input_ids=tokens[b:b + 1].clamp(min=0), position_ids=None)
            hidden = torch.cat([text[:SLOT], model.vision_projection(vision[:, b:b + 1]), text[SLOT + 1:]], 0)
            freqs = model.rotary_pos_emb(s)
            for i, layer in enumerate(model.decoder.layers):
                if i == k:
                    entering = hidden.clone()
                    hidden, freqs = hidden[keep], freqs[keep]
                hidden, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=freqs)
            if k < len(model.decoder.layers):
                entering[keep] = hidden
                hidden = entering
            expected_logits, _ = model.output_layer(model.decoder.final_layernorm(hidden[at]))
        torch.testing.assert_close(logits[b], expected_logits[:, 0], atol=1e-5, rtol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="k=0"):
        FastVConfig(k=0, r=0.5)
    with pytest.raises(ValueError, match="r=1.5"):
        FastVConfig(k=2, r=1.5)
    with pytest.raises(ValueError, match="ranking 'middle'"):
        FastVConfig(k=2, r=0.5, ranking="middle")


def _fastv_at(parallel):
    model, tokens, vision = _model_and_batch(parallel)
    logits, kept = fastv_logits(model, tokens, vision, FastVConfig(k=2, r=0.5, ranking="all_tokens"))
    return logits[..., :TINY_LM.vocab_size], kept


@pytest.mark.slow
def test_tp2_equals_tp1():
    [(single, kept1)] = run_world(1, ParallelConfig(), _fastv_at, ParallelConfig())
    tp2 = run_world(2, ParallelConfig(tensor_model_parallel_size=2), _fastv_at,
                    ParallelConfig(tensor_model_parallel_size=2))
    for logits, kept in tp2:
        assert kept.tolist() == kept1.tolist()
        torch.testing.assert_close(logits, single, atol=1e-5, rtol=1e-5)
    assert TINY_VISION.hidden_size == 48
