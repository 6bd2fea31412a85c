"""Parameter and FLOPs accounting for the language decoder, under the paper's counting rule.

The rule (DESIGN.md section 2): forward FLOPs of the language decoder only, 2 x MACs of every matmul;
embedding lookups, norms, softmax, RoPE, activations and biases count as zero; the vision encoder is
excluded. What the paper's tables pin down beyond that (checked cell by cell in tests/test_flops.py):

- QK^T and AV are counted in full, with no discount for the causal mask: halving them for vanilla would
  put its Table 10 attention column 8-32% low, while full counting is within 1.6% on every attention cell.
- The LM head runs at every position the decoder processes (all N+M for vanilla), not only the text:
  Qwen2-0.5B vanilla at 728:64 is 837 G only with the 151936-wide head applied 792 times.
- Table 10's attention part is the Q/K/V/O projections + QK^T + AV + (HiMix) the vision K/V projections;
  the FFN part is the MLP. The head is in neither: it is only in the total (Table 5).
- The vanilla connector is not "language decoder": with it, the 20 vanilla cells of Table 5 are all
  biased high (mean +0.26%); without it they scatter around zero (mean -0.06%, max 0.31%). DESIGN's
  decoder parameter counts (Llama-3.2-1B 1.236 B, Vicuna-7B 6.74 B) exclude it too. We therefore keep
  every connector (vanilla, and the Fig. 4 variants) out of `params` and `flops`, and report it
  separately in `connector_params` / `connector_flops`, since for "hierarchical" it is a large cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass

from himix_megatron.config import (
    ARCHS,
    ConfigError,
    LanguageModelConfig,
    VisionModelConfig,
    default_mod_layers,
    language_model_preset,
    vision_model_preset,
)

STAGES: tuple[str, ...] = ("pretrain", "further-pretrain", "finetune")


@dataclass(frozen=True)
class DecoderCost:
    """Decoder parameters and forward FLOPs of one sample (plain numbers, not giga)."""

    params: int
    flops: int  # attn_flops + ffn_flops + LM head
    attn_flops: int
    ffn_flops: int
    connector_params: int = 0  # outside the decoder, see the module docstring
    connector_flops: int = 0


@dataclass(frozen=True)
class _Layer:
    """Forward FLOPs of the matmuls of one decoder layer, and the shape of its attention."""

    qkv: int  # text Q, K, V projections
    out: int  # output projection
    vision_kv: int  # K/V projections of the N vision tokens (dedicated for himix, shared otherwise)
    scores: int  # QK^T
    mix: int  # AV
    mlp: int
    queries: int
    vision_keys: int


def _check(arch: str, vision_tokens: int, text_tokens: int) -> None:
    if arch not in ARCHS:
        raise ConfigError(f"arch={arch!r} is not one of {list(ARCHS)}")
    for field, value in (("vision_tokens", vision_tokens), ("text_tokens", text_tokens)):
        if value < 0:
            raise ConfigError(f"{field}={value} must be >= 0")


def _layer(lm: LanguageModelConfig, arch: str, n: int, m: int, d_v: int) -> _Layer:
    d, kv, q = lm.hidden_size, lm.kv_dim, lm.num_attention_heads * lm.kv_channels
    # Vanilla runs the whole N+M sequence through the layer; the injection variants keep vision out of
    # the residual stream and only let the M text queries attend over N vision + M text keys.
    tokens, vision_in = (n + m, 0) if arch == "vanilla" else (m, n)
    # HiMix projects raw SigLIP features (width d_v) with its own W_K,v / W_V,v; the Fig. 4 variants
    # push connector outputs (width d) through the layer's text K/V projections.
    vision_width = d_v if arch == "himix" else d
    return _Layer(
        qkv=2 * tokens * d * (q + 2 * kv),
        out=2 * tokens * q * d,
        vision_kv=2 * vision_in * vision_width * 2 * kv,
        # Per query head the score and mixing matmuls are head_dim wide; summed over heads that is q.
        # GQA shares K/V between heads but not the work.
        scores=2 * tokens * (tokens + vision_in) * q,
        mix=2 * tokens * (tokens + vision_in) * q,
        mlp=2 * tokens * 3 * d * lm.ffn_hidden_size,  # SwiGLU: gate, up, down
        queries=tokens,
        vision_keys=vision_in,
    )


def _head_flops(lm: LanguageModelConfig, arch: str, n: int, m: int) -> int:
    return 2 * (n + m if arch == "vanilla" else m) * lm.hidden_size * lm.vocab_size


def _lm_params(lm: LanguageModelConfig) -> int:
    d, kv, q = lm.hidden_size, lm.kv_dim, lm.num_attention_heads * lm.kv_channels
    attn = d * (q + 2 * kv) + q * d + (q + 2 * kv if lm.qkv_bias else 0)
    layer = attn + 3 * d * lm.ffn_hidden_size + 2 * d  # + the two RMSNorm weights
    embeddings = lm.vocab_size * d * (1 if lm.tie_embeddings else 2)
    return embeddings + lm.num_layers * layer + d  # + final norm


def _connector_params(d_in: int, d: int) -> int:
    """LLaVA's mlp2x_gelu: Linear(d_in, d) -> GELU -> Linear(d, d), both with bias."""
    return d_in * d + d + d * d + d


def decoder_cost(
    lm: LanguageModelConfig, arch: str, vision_tokens: int, text_tokens: int, vision_hidden_size: int = 1152
) -> DecoderCost:
    """Parameters and forward FLOPs of the language decoder for one sample of N vision + M text tokens."""
    _check(arch, vision_tokens, text_tokens)
    n, m, d_v, L, d = vision_tokens, text_tokens, vision_hidden_size, lm.num_layers, lm.hidden_size
    t = _layer(lm, arch, n, m, d_v)
    attn = L * (t.qkv + t.out + t.vision_kv + t.scores + t.mix)
    ffn = L * t.mlp
    params = _lm_params(lm)
    if arch == "himix":
        # Per layer: RMSNorm_v weight, W_K,v and W_V,v (+ their biases where the LM's QKV has bias).
        params += L * (d_v + 2 * d_v * lm.kv_dim + (2 * lm.kv_dim if lm.qkv_bias else 0))
    connectors = {"himix": 0, "vanilla": 1, "uniform": 1, "hierarchical": L}[arch]
    return DecoderCost(
        params=params,
        flops=attn + ffn + _head_flops(lm, arch, n, m),
        attn_flops=attn,
        ffn_flops=ffn,
        connector_params=connectors * _connector_params(d_v, d),
        connector_flops=connectors * 2 * n * (d_v * d + d * d),
    )


def fastv_cost(lm: LanguageModelConfig, vision_tokens: int, text_tokens: int, k: int, r: float) -> DecoderCost:
    """Vanilla with FastV: layers 0..K-1 see all N image tokens, layers K.. only round(N * (1 - R)) of them.

    The LM head runs at every position that reaches the last layer (N' + M), the rule that reproduces the
    paper's Table 9 (Llama-3.2-1B at 728:64, all eight FastV cells within 0.4%; tests/test_flops.py). The
    ranking itself (the last query's attention over the image tokens) is not a matmul and counts as zero.
    """
    _check("vanilla", vision_tokens, text_tokens)
    if not 0 <= k <= lm.num_layers:
        raise ConfigError(f"fastv_k={k} must be between 0 and the {lm.num_layers} layers of {lm.name}")
    if not 0.0 <= r <= 1.0:
        raise ConfigError(f"fastv_r={r} must be a fraction between 0 and 1")
    kept = round(vision_tokens * (1 - r)) if k < lm.num_layers else vision_tokens  # K = L: nothing is pruned
    full, pruned = (_layer(lm, "vanilla", n, text_tokens, 0) for n in (vision_tokens, kept))
    attn = sum(count * (t.qkv + t.out + t.scores + t.mix) for count, t in ((k, full), (lm.num_layers - k, pruned)))
    ffn = k * full.mlp + (lm.num_layers - k) * pruned.mlp
    return DecoderCost(params=_lm_params(lm), flops=attn + ffn + _head_flops(lm, "vanilla", kept, text_tokens),
                       attn_flops=attn, ffn_flops=ffn)


def gamma_mod_cost(lm: LanguageModelConfig, vision_tokens: int, text_tokens: int, mod_layers=None,
                   capacity: float = 0.5, system_tokens: int = 0, router_bias: bool = False,
                   skip: str = "layer") -> DecoderCost:
    """Vanilla with gamma-MoD layers (model/gamma_mod.py), each processing its routed tokens only.

    A MoD layer routes every question/answer token plus ceil(capacity x R) of the R = N + system_tokens image
    and system-prompt tokens (the training rule; pass the fraction measured at inference as `capacity` to count
    threshold routing). Its Q/K/V/O projections and MLP run at those k tokens, QK^T and AV over k x k (skipped
    tokens are neither queries nor keys there, as in the official code), plus the router's Linear(d, 2) over
    all N + M tokens, counted with the FFN part. Every position still reaches the LM head. mod_layers: 0-based,
    default every layer but the first three and the last. skip="mlp" (the variant): attention at all N + M
    tokens, only the MLP at k.
    """
    _check("vanilla", vision_tokens, text_tokens)
    L, d = lm.num_layers, lm.hidden_size
    layers = default_mod_layers(L) if mod_layers is None else tuple(mod_layers)
    if any(not 0 <= i < L for i in layers) or len(set(layers)) != len(layers):
        raise ConfigError(f"mod_layers={list(layers)} must be distinct layers of the {L} of {lm.name}")
    if not 0.0 < capacity <= 1.0:
        raise ConfigError(f"mod_capacity={capacity} must be in (0, 1]")
    if system_tokens < 0:
        raise ConfigError(f"system_tokens={system_tokens} must be >= 0")
    s = vision_tokens + text_tokens
    routable = min(vision_tokens + system_tokens, s)
    routed = s - routable + math.ceil(capacity * routable - 1e-9)
    if skip not in ("layer", "mlp"):
        raise ConfigError(f"mod_skip={skip!r} must be 'layer' or 'mlp'")
    full, part = _layer(lm, "vanilla", vision_tokens, text_tokens, 0), _layer(lm, "vanilla", routed, 0, 0)
    router = 2 * s * d * 2
    mod, dense = len(layers), L - len(layers)
    mod_attention = full if skip == "mlp" else part
    attn = dense * (full.qkv + full.out + full.scores + full.mix) + \
        mod * (mod_attention.qkv + mod_attention.out + mod_attention.scores + mod_attention.mix)
    ffn = dense * full.mlp + mod * (part.mlp + router)
    return DecoderCost(params=_lm_params(lm) + 2 * d + (2 if router_bias else 0),
                       flops=attn + ffn + _head_flops(lm, "vanilla", vision_tokens, text_tokens),
                       attn_flops=attn, ffn_flops=ffn)


def gamma_mod_training_flops(lm: LanguageModelConfig, vision_tokens: int, text_tokens: int, stage: str, **mod) -> int:
    """Forward + backward FLOPs of one gamma-MoD training sample: every parameter trains (finetune or
    further-pretrain), so, as `training_flops` derives, the total is exactly 3 x the forward."""
    if stage not in STAGES or stage == "pretrain":
        raise ConfigError(f"stage={stage!r}: gamma-MoD trains in finetune / further-pretrain")
    return 3 * gamma_mod_cost(lm, vision_tokens, text_tokens, **mod).flops


def training_flops(
    lm: LanguageModelConfig,
    arch: str,
    vision_tokens: int,
    text_tokens: int,
    stage: str,
    vision_hidden_size: int = 1152,
) -> int:
    """Forward + backward FLOPs of one training sample, over the same matmuls as `decoder_cost(...).flops`.

    These are model FLOPs, the matmuls of the textbook backward, as MFU counts them. An implementation
    may execute less: HiMix's vision K/V backward (model/vision_kv.py) skips the input-gradient matmul
    that the finetune count below includes, because X_v itself never needs a gradient.

    Backward of a matmul costs one forward's worth per operand that needs a gradient: the input gradient
    (dX = dY W^T) whenever a trainable parameter lies upstream of X, the weight gradient (dW = X^T dY)
    only for trainable W. QK^T and AV have two activation operands, so their input gradients can cost
    twice the forward.

    - finetune / further-pretrain: the whole LM and the vision-side parameters train. The embedding
      table trains too, so gradients reach the bottom of layer 0: every input and weight gradient is
      needed, and the total is exactly 3 x forward.
    - pretrain, vanilla: only the connector trains. It feeds layer 0's input, so every input gradient is
      needed and no weight gradient inside the decoder is.
    - pretrain, himix / uniform / hierarchical: only the vision-side parameters train (RMSNorm_v, W_K,v,
      W_V,v; or the connectors). The head and layers 1..L-1 need all input gradients, because their
      inputs depend on the vision K/V of the layers below. Layer 0 only needs the path from its output
      down to its vision K/V: the MLP and output-projection input gradients, dP = dO V^T for all keys
      (softmax backward needs the full row), dK and dV for the vision keys only, and the vision K/V
      input gradient (RMSNorm_v's weight or the connector needs it). Layer 0's text Q/K/V gradients and
      its text QKV-projection input gradient are skipped: nothing below them trains. Weight gradients:
      himix's W_K,v / W_V,v; the variants' connectors are outside this count.
    """
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r} is not one of {list(STAGES)}")
    cost = decoder_cost(lm, arch, vision_tokens, text_tokens, vision_hidden_size)
    t = _layer(lm, arch, vision_tokens, text_tokens, vision_hidden_size)
    L, forward = lm.num_layers, cost.flops
    core = L * (t.scores + t.mix)
    if stage != "pretrain":
        # input gradients: every matmul once, QK^T/AV twice; weight gradients: every linear once.
        return forward + (forward + core) + (forward - core)
    if arch == "vanilla":
        return forward + (forward + core)
    per_query_key = 2 * t.queries * lm.num_attention_heads * lm.kv_channels  # one matmul, one key
    # dP = dO V^T has the shape of AV's forward; dK_v and dV_v are one key column-block each.
    layer0_input_grads = t.mlp + t.out + t.vision_kv + t.mix + 2 * per_query_key * t.vision_keys
    upper_input_grads = (L - 1) * (t.qkv + t.out + t.vision_kv + t.mlp + 2 * (t.scores + t.mix))
    head_input_grad = _head_flops(lm, arch, vision_tokens, text_tokens)
    weight_grads = L * t.vision_kv if arch == "himix" else 0
    return forward + head_input_grad + upper_input_grads + layer0_input_grads + weight_grads


@dataclass(frozen=True)
class EncoderCost:
    """Vision-encoder parameters and forward FLOPs of one image (plain numbers, not giga).

    `params` / `flops` are the whole published tower (every layer, SigLIP's pooling head), as Table 6
    counts it; `feature_params` / `feature_flops` are what HiMix runs: up to the penultimate layer, no
    post-LayerNorm, no head (model/vision.py). `attn_core_flops` is the QK^T + AV part of `flops`.
    """

    params: int
    flops: int
    attn_core_flops: int
    head_flops: int  # SigLIP's attention-pooling head (0 for CLIP), part of `flops`
    feature_params: int
    feature_flops: int
    tokens: int  # sequence length inside the encoder (patches, + CLIP's class token)
    num_features: int  # N, the tokens HiMix feeds the decoder


def vision_encoder_cost(vision: VisionModelConfig) -> EncoderCost:
    """Parameters and forward FLOPs per image of a SigLIP / CLIP vision tower, under the paper's rule.

    Rule: 2 x MACs of every matmul, the same as `decoder_cost`: the Q/K/V/O projections, QK^T and AV in
    full, the MLP; the patch-embedding conv as the matmul it is ([patches, 3 p^2] x [3 p^2, d]); norms,
    softmax, activations, biases and the class-token / position additions count as zero. Parameters
    are those of transformers' SiglipVisionModel / CLIPVisionModel: a CLIPModel's `visual_projection`
    is not the encoder (with it TinyCLIP-39M/-40M would be 0.039/0.040 B, not Table 6's 0.038/0.039).
    SigLIP's head (MultiheadAttentionPoolingHead) is counted: one probe query over all tokens (its K/V
    projections run at every token, 3.9 GFLOPs for so400m), out projection and MLP on one token.

    Table 6 reproduction (tests/test_vision_flops.py), params exact to the printed digits:
      SigLIP-so400m-384  0.428 B / 670.35 G vs 0.428 / 670.89 (-0.08%): all 27 layers, attention and head.
      TinyCLIP-40M/32    0.039 B /   3.99 G vs 0.039 /   3.93 (+1.5%)
      TinyCLIP-61M/32    0.061 B /   6.17 G vs 0.061 /   6.10 (+1.1%)
      TinyCLIP-39M/16    0.038 B /  15.98 G vs 0.038 /  15.04 (+6.3%, outside 4%)
    The three TinyCLIP cells are all reproduced to 0.15% (15.03, 3.93, 6.09) by the same count *without*
    QK^T and AV (`flops - attn_core_flops`), and only the 196-token 39M/16 is far enough from it to
    show: the paper's tool apparently saw no attention matmuls in TinyCLIP's open_clip towers, whose
    nn.MultiheadAttention(need_weights=False) runs as one fused kernel that module-hook FLOP counters
    skip, while it saw them in HF SigLIP (without them SigLIP would be 604.2 G, -9.9%). We keep one rule
    for every encoder (and the decoder), so 39M/16 stays +6.3% above the paper. Counting only up to the
    penultimate layer (what HiMix runs, `feature_flops`) explains none of the cells: SigLIP 641.8 G
    (-4.3%), TinyCLIP 14.66 / 3.67 / 5.67 G (-2.5%, -6.6%, -7.0%).
    """
    d, f, L, p = vision.hidden_size, vision.ffn_hidden_size, vision.num_layers, vision.patch_size
    patches, s = vision.num_patches, vision.seq_length
    siglip = vision.kind == "siglip"
    conv_flops = 2 * patches * (3 * p * p) * d
    linear = 2 * s * (4 * d * d + 2 * d * f)  # Q, K, V, O projections + MLP fc1, fc2
    core = 2 * 2 * s * s * d  # QK^T + AV, summed over heads
    # SigLIP's head: q for the probe, k/v at every token, scores/mix for one query, out, MLP on one token.
    head = (2 * d * d + 2 * s * 2 * d * d + 2 * 2 * s * d + 2 * d * d + 2 * 2 * d * f) if siglip else 0

    layer_params = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # attention, MLP, two LayerNorms
    embed_params = 3 * p * p * d + (d if siglip else 0) + s * d + (0 if siglip else d + 2 * d)  # conv(+bias),
    # positions; CLIP: class embedding and pre-LayerNorm
    head_params = (d + 3 * (d * d + d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)) if siglip else 0
    feature_params = embed_params + (L - 1) * layer_params
    return EncoderCost(
        params=feature_params + layer_params + 2 * d + head_params,  # + last layer, post-LayerNorm, head
        flops=conv_flops + L * (linear + core) + head,
        attn_core_flops=L * core,
        head_flops=head,
        feature_params=feature_params,
        feature_flops=conv_flops + (L - 1) * (linear + core),
        tokens=s,
        num_features=vision.num_features,
    )


def _print_encoder(args, vision: VisionModelConfig) -> int:
    cost = vision_encoder_cost(vision)
    if args.json:
        print(json.dumps({"vision_model": vision.name, **dataclasses.asdict(cost)}))
        return 0
    g = 1e9
    print(f"{vision.name} ({vision.kind}), {vision.image_size} px, patch {vision.patch_size}: "
          f"{cost.num_features} x {vision.hidden_size} features, {cost.tokens} tokens inside")
    print(f"  params (whole tower)      {cost.params / g:10.3f} B")
    print(f"  forward GFLOPs per image  {cost.flops / g:10.2f}")
    print(f"    of which QK^T + AV      {cost.attn_core_flops / g:10.2f}")
    if cost.head_flops:
        print(f"    of which pooling head   {cost.head_flops / g:10.2f}")
    print(f"  up to the penultimate layer (what HiMix runs): {cost.feature_params / g:.3f} B params, "
          f"{cost.feature_flops / g:.2f} GFLOPs")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m himix_megatron.flops",
        description="Language-decoder parameters and forward FLOPs of one sample, as the HiMix paper counts them.",
    )
    parser.add_argument("--model", default=None,
                        help="language model preset, e.g. llama3.2-1b (required, unless --vision-model alone asks "
                             "for the vision encoder's parameters and FLOPs per image)")
    parser.add_argument("--arch", default="himix", choices=ARCHS + ("fastv", "gamma-mod"),
                        help="fastv: vanilla pruned by FastV at inference (--fastv-k, --fastv-r); gamma-mod: vanilla "
                             "with gamma-MoD layers (--mod-layers, --mod-capacity, --mod-system-tokens)")
    parser.add_argument("--fastv-k", type=int, default=2, help="FastV: the layer from which image tokens are pruned")
    parser.add_argument("--fastv-r", type=float, default=0.5, help="FastV: the fraction of image tokens pruned")
    parser.add_argument("--mod-layers", default=None,
                        help="gamma-MoD: comma-separated 0-based MoD layers (default: all but the first 3 and last)")
    parser.add_argument("--mod-capacity", type=float, default=0.5,
                        help="gamma-MoD: fraction of the image and system-prompt tokens a MoD layer processes")
    parser.add_argument("--mod-system-tokens", type=int, default=0,
                        help="gamma-MoD: system-prompt tokens among the text tokens (routable like the image)")
    parser.add_argument("--mod-skip", choices=("layer", "mlp"), default="layer",
                        help="gamma-MoD: a skipped token skips the whole layer (official) or only the MLP")
    parser.add_argument("--vision-model", default=None,
                        help="supplies the vision width d_v (default siglip-so400m-384); without --model: print this "
                             "encoder's parameters and forward FLOPs per image (e.g. tinyclip-39m)")
    parser.add_argument(
        "--vision-tokens", type=int, default=None, help="N (default: the vision model's feature count, 728)"
    )
    parser.add_argument("--text-tokens", type=int, default=64, help="M (default 64)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    args = parser.parse_args(argv)

    if args.model is None:
        if args.vision_model is None:
            parser.error("--model is required (or give --vision-model alone for the encoder's cost)")
        try:
            return _print_encoder(args, vision_model_preset(args.vision_model))
        except ConfigError as e:
            parser.error(f"--vision-model: {e}")
    try:
        lm = language_model_preset(args.model)
    except ConfigError as e:
        parser.error(f"--model: {e}")
    try:
        vision = vision_model_preset(args.vision_model or "siglip-so400m-384")
    except ConfigError as e:
        parser.error(f"--vision-model: {e}")
    n = vision.num_features if args.vision_tokens is None else args.vision_tokens
    if n < 0:
        parser.error(f"--vision-tokens must be >= 0, got {n}")
    if args.text_tokens < 0:
        parser.error(f"--text-tokens must be >= 0, got {args.text_tokens}")

    try:
        if args.arch == "gamma-mod":
            layers = None
            if args.mod_layers is not None:
                try:
                    layers = tuple(int(i) for i in args.mod_layers.replace(",", " ").split())
                except ValueError:
                    parser.error(f"--mod-layers {args.mod_layers!r}: expected comma-separated layer indices")
            cost = gamma_mod_cost(lm, n, args.text_tokens, layers, args.mod_capacity, args.mod_system_tokens,
                                  skip=args.mod_skip)
        elif args.arch == "fastv":
            cost = fastv_cost(lm, n, args.text_tokens, args.fastv_k, args.fastv_r)
        else:
            cost = decoder_cost(lm, args.arch, n, args.text_tokens, vision.hidden_size)
    except ConfigError as e:
        parser.error(str(e))
    if args.json:
        keys = ("params", "flops", "attn_flops", "ffn_flops")
        print(json.dumps({k: getattr(cost, k) for k in keys}))
        return 0
    g = 1e9
    arch = f"fastv K={args.fastv_k} R={args.fastv_r:g}" if args.arch == "fastv" else args.arch
    if args.arch == "gamma-mod":
        arch = (f"gamma-mod capacity={args.mod_capacity:g}, {args.mod_system_tokens} system tokens, "
                f"skipping the {args.mod_skip}")
    print(f"{lm.name} ({arch}), {n} vision + {args.text_tokens} text tokens, d_v={vision.hidden_size}")
    print(f"  decoder params   {cost.params / g:10.3f} B")
    print(f"  forward GFLOPs   {cost.flops / g:10.1f}")
    print(f"    attention      {cost.attn_flops / g:10.1f}")
    print(f"    FFN            {cost.ffn_flops / g:10.1f}")
    print(f"    LM head        {(cost.flops - cost.attn_flops - cost.ffn_flops) / g:10.1f}")
    if cost.connector_params:
        print(
            f"  connector(s), not counted above: {cost.connector_params / g:.3f} B params, "
            f"{cost.connector_flops / g:.1f} GFLOPs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
