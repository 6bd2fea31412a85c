"""FastV on the vanilla LLaVA model, for forward-only evaluation (the paper's Table 9 baseline).

FastV (Chen et al., 2024; its official code, as DESIGN.md section 5 records): after decoder layer K-1, rank the
N image tokens by the attention they receive in layer K-1 from the last query token, averaged over heads
(the official choice; `ranking="all_tokens"` averages over every query instead), per sample; keep the top
round(N * (1 - R)); layers K and later run over the text and the kept image tokens, in their order, each token
keeping its original RoPE position. The image tokens are where each sample's image id put them (vanilla's
splice: `<s> {system} USER: <N image tokens> \n {question} ASSISTANT:`). Layers before K, and R = 0, are
exactly the vanilla model. A pruned token's output is its state entering layer K, as in the HF export's FastV
(only the image id's own position can be one: its output is the last image token's).

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

from himix_megatron.data.templates import IMAGE_TOKEN_INDEX

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


def _attention_to_images(layer, hidden: Tensor, rope: Tensor, image_at: Tensor, ranking: str, heads: int) -> Tensor:
    """[b, N]: the head-averaged attention layer `layer` gives the image tokens (at positions image_at [b, N])
    from the last query token, or averaged over every query; causal, as the layer itself attends."""
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
    received = scores.softmax(-1).sum(dim=1).mean(dim=1)  # [b, S]: sum over this rank's heads, mean over queries
    received = received.gather(1, image_at)
    received = tensor_parallel.reduce_from_tensor_model_parallel_region(received)  # every head, all TP ranks
    return received / heads


@torch.no_grad()
def fastv_logits(model, input_ids: Tensor, vision_features: Tensor, fastv: FastVConfig) -> tuple[Tensor, Tensor]:
    """(text logits [b, M, V], kept image-token indices [b, N'] in original order, 0..N-1) of the vanilla `model`
    (VanillaLLaVAModel, PP = 1) for text ids [b, M], each holding one image id, and images X_v [N, b, d_v]."""
    from megatron.core import parallel_state

    from himix_megatron.model.vanilla import check_image_slots, spliced_layout

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
    check_image_slots(input_ids, vision_features, None)
    order, text_at = spliced_layout(input_ids, n)
    s = n + m - 1  # every sample has its image: the spare last position (the image id) is left out
    text = model.embedding(input_ids=input_ids.clamp(min=0), position_ids=None)  # [M, b, d]
    hidden = torch.cat([model.vision_projection(vision_features.to(text.dtype)), text], dim=0)
    hidden = hidden.gather(0, order[:s, :, None].expand(-1, -1, hidden.shape[-1]))  # [S, b, d] spliced
    image_at = (input_ids == IMAGE_TOKEN_INDEX).int().argmax(1, keepdim=True) + torch.arange(n, device=hidden.device)
    freqs = model.rotary_pos_emb(s)[:, 0, 0]  # [S, dim]: one row per original position
    positions = torch.arange(s, device=hidden.device).expand(b, s)  # [b, S'] original positions
    kept = torch.arange(n, device=hidden.device).expand(b, n)
    entering = None  # the states entering layer K, where pruned tokens take their output from
    heads = config.num_attention_heads
    prune = fastv.kept(n) < n
    for i, layer in enumerate(layers):
        rope = freqs[positions.T].unsqueeze(2)  # [S', b, 1, dim]: per sample, since kept tokens differ
        if i == fastv.k - 1 and prune:
            received = _attention_to_images(layer, hidden, rope, image_at, fastv.ranking, heads)
        hidden, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        if i == fastv.k - 1 and prune:
            kept = received.topk(fastv.kept(n), dim=-1).indices.sort(dim=-1).values  # [b, N'], original order
            pruned = torch.zeros(b, s, dtype=torch.bool, device=hidden.device)
            pruned.scatter_(1, image_at, True)
            pruned.scatter_(1, image_at.gather(1, kept), False)
            positions = torch.sort(torch.where(pruned, s, positions), dim=1).values[:, : s - n + fastv.kept(n)]
            entering = hidden
            hidden = hidden.gather(0, positions.T[..., None].expand(-1, -1, hidden.shape[-1]))
    if entering is not None:  # layers >= K ran for the kept tokens only
        hidden = entering.scatter(0, positions.T[..., None].expand(-1, -1, hidden.shape[-1]), hidden)
    hidden = model.decoder.final_layernorm(hidden.gather(0, text_at[..., None].expand(-1, -1, hidden.shape[-1])))
    logits, _ = model.output_layer(hidden)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits.transpose(0, 1).contiguous(), kept
