"""FastV on the vanilla LLaVA model, for forward-only evaluation (the paper's Table 9 baseline).

FastV (Chen et al., 2024; its official code, as DESIGN.md section 5 records): after decoder layer K-1, rank the
N image tokens by the attention they receive in layer K-1 from the last query token, averaged over heads
(the official choice; `ranking="all_tokens"` averages over every query instead), per sample; keep the top
round(N * (1 - R)); layers K and later run over [kept image tokens; text], each token keeping its original
RoPE position. Layers before K, and R = 0, are exactly the vanilla model.

This runs the vanilla model's own modules layer by layer (embedding, connector, megatron's TransformerLayers,
final norm, output layer), so TP works as it does in training: each rank ranks with its own heads and one
all-reduce sums the head averages. One pipeline stage only (PP = 1): pruning changes the sequence length
between layers, which the pipeline's fixed send/receive shapes do not allow. The HF export's FastV
(`hf/modeling_llava_baselines.py`) implements the same rule with a KV cache for generation; a test checks
that both give the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from torch import Tensor

RANKINGS = ("last_token", "all_tokens")


@dataclass(frozen=True)
class FastVConfig:
    k: int  # the first layer that sees only the kept image tokens
    r: float  # the fraction of image tokens pruned
    ranking: str = "last_token"

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"FastV k={self.k} must be >= 1: layer K-1's attention ranks the image tokens")
        if not 0.0 <= self.r <= 1.0:
            raise ValueError(f"FastV r={self.r} must be a fraction between 0 and 1")
        if self.ranking not in RANKINGS:
            raise ValueError(f"FastV ranking {self.ranking!r}: choose one of {RANKINGS}")

    def kept(self, n: int) -> int:
        return round(n * (1 - self.r))


def _attention_to_images(layer, hidden: Tensor, rope: Tensor, n: int, ranking: str, heads: int) -> Tensor:
    """[b, N]: the head-averaged attention layer `layer` gives the image tokens (the first N) from the last
    query token, or averaged over every query; causal, as the layer itself attends."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    attention = layer.self_attention
    query, key, _ = attention.get_query_key_value_tensors(layer.input_layernorm(hidden))  # [S, b, h|g, hd]
    query = apply_rotary_pos_emb(query, rope, config=attention.config)
    key = apply_rotary_pos_emb(key, rope, config=attention.config)
    key = key.repeat_interleave(query.shape[2] // key.shape[2], dim=2)  # GQA: each head's own key group
    if ranking == "last_token":
        query = query[-1:]
    scores = torch.einsum("qbhd,kbhd->bhqk", query.float(), key.float()) / query.shape[-1] ** 0.5
    s = key.shape[0]
    rows = torch.arange(s - query.shape[0], s, device=hidden.device)
    scores = scores.masked_fill(torch.arange(s, device=hidden.device)[None, :] > rows[:, None], float("-inf"))
    received = scores.softmax(-1)[..., :n].sum(dim=1).mean(dim=1)  # sum over this rank's heads, mean over queries
    received = tensor_parallel.reduce_from_tensor_model_parallel_region(received)  # every head, all TP ranks
    return received / heads


@torch.no_grad()
def fastv_logits(model, input_ids: Tensor, vision_features: Tensor, fastv: FastVConfig) -> tuple[Tensor, Tensor]:
    """(text logits [b, M, V], kept image-token indices [b, N'] in original order) of the vanilla `model`
    (VanillaLLaVAModel, PP = 1) for text ids [b, M] after images X_v [N, b, d_v]."""
    from megatron.core import parallel_state

    if not (model.pre_process and model.post_process):
        raise ValueError("FastV runs the whole decoder in one pipeline stage (PP = 1)")
    config = model.config
    if config.sequence_parallel or config.apply_rope_fusion:
        raise ValueError("FastV needs per-sample RoPE positions: run it without --sequence-parallel and without "
                         "fused RoPE (apply_rope_fusion)")
    n, (b, m) = vision_features.shape[0], input_ids.shape
    layers = model.decoder.layers
    if fastv.k > len(layers):
        raise ValueError(f"FastV k={fastv.k} exceeds the decoder's {len(layers)} layers")
    text = model.embedding(input_ids=input_ids, position_ids=None)  # [M, b, d]
    hidden = torch.cat([model.vision_projection(vision_features.to(text.dtype)), text], dim=0)  # [N+M, b, d]
    freqs = model.rotary_pos_emb(n + m)[:, 0, 0]  # [N+M, dim]: one row per original position
    positions = torch.arange(n + m, device=hidden.device).expand(b, n + m)  # [b, S] original positions
    kept = torch.arange(n, device=hidden.device).expand(b, n)
    heads = config.num_attention_heads
    for i, layer in enumerate(layers):
        rope = freqs[positions.T].unsqueeze(2)  # [S, b, 1, dim]: per sample, since kept tokens differ
        if i == fastv.k - 1 and fastv.kept(n) < n:
            received = _attention_to_images(layer, hidden, rope, n, fastv.ranking, heads)
        hidden, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        if i == fastv.k - 1 and fastv.kept(n) < n:
            kept = received.topk(fastv.kept(n), dim=-1).indices.sort(dim=-1).values  # [b, N'], original order
            keep = torch.cat([kept, torch.arange(n, n + m, device=hidden.device).expand(b, m)], dim=1)
            hidden = hidden.gather(0, keep.T[..., None].expand(-1, -1, hidden.shape[-1]))
            positions = keep
    hidden = model.decoder.final_layernorm(hidden)
    logits, _ = model.output_layer(hidden[-m:])
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits.transpose(0, 1).contiguous(), kept
