"""HiMix forward written out by hand in plain torch, from DESIGN.md section 1, for tests.

Deliberately naive (a loop over heads, explicit masks) and independent of megatron-core's modules.
It reads megatron-core's parameter layout: linear_qkv rows are grouped per query group as
[q_0 .. q_{h-1}, k, v], linear_kv_vision rows per group as [k, v], linear_fc1 is [gate; up].
"""

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, base):
    """x [M, hn] at positions 0..M-1, rotate-half convention."""
    m, hn = x.shape
    inv_freq = 1.0 / base ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn)
    angles = torch.arange(m, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def himix_logits(weights, lm, tokens, vision):
    """tokens [b, M]; vision [N, b, d_v] or None -> logits [b, M, vocab]."""
    heads, groups, hn = lm.num_attention_heads, lm.num_query_groups, lm.kv_channels
    per_group = heads // groups
    eps = lm.norm_epsilon
    out = []
    for b in range(tokens.shape[0]):
        h = weights["embedding.word_embeddings.weight"][tokens[b]]  # [M, d]
        m = h.shape[0]
        n = 0 if vision is None else vision.shape[0]
        for i in range(lm.num_layers):
            p = f"decoder.layers.{i}."
            w = lambda name: weights[p + name]  # noqa: E731
            x = rms_norm(h, w("input_layernorm.weight"), eps)
            qkv = (x @ w("self_attention.linear_qkv.weight").T).view(m, groups, per_group + 2, hn)
            if n:
                xv = rms_norm(vision[:, b], w("self_attention.vision_norm.weight"), eps)
                kv_vision = (xv @ w("self_attention.linear_kv_vision.weight").T).view(n, groups, 2, hn)
            heads_out = []
            for head in range(heads):
                g = head // per_group
                q = rope(qkv[:, g, head % per_group], lm.rotary_base)
                k = rope(qkv[:, g, per_group], lm.rotary_base)
                v = qkv[:, g, per_group + 1]
                if n:  # vision keys first, no RoPE
                    k = torch.cat([kv_vision[:, g, 0], k])
                    v = torch.cat([kv_vision[:, g, 1], v])
                scores = q @ k.T / math.sqrt(hn)  # [M, N+M]
                # text query j sees every vision key and text keys 0..j
                allowed = torch.ones(m, n + m, dtype=torch.bool)
                allowed[:, n:] = torch.tril(torch.ones(m, m, dtype=torch.bool))
                scores = scores.masked_fill(~allowed, float("-inf"))
                heads_out.append(scores.softmax(-1) @ v)
            h = h + torch.cat(heads_out, -1) @ w("self_attention.linear_proj.weight").T
            x = rms_norm(h, w("pre_mlp_layernorm.weight"), eps)
            gate, up = (x @ w("mlp.linear_fc1.weight").T).chunk(2, -1)
            h = h + (F.silu(gate) * up) @ w("mlp.linear_fc2.weight").T
        h = rms_norm(h, weights["decoder.final_layernorm.weight"], eps)
        head_w = weights.get("output_layer.weight", weights["embedding.word_embeddings.weight"])
        out.append(h @ head_w.T)
    return torch.stack(out)
