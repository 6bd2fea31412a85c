"""gamma-MoD (Luo et al., 2024) on the vanilla LLaVA model: mixture-of-depth layers with masked routing.

What its official code does (Yaxin9Luo/Gamma-MOD, gamma_mod/model/language_model/llava_llama_mod.py), and so
what this module does:

- Which layers: `mod_mode="arank_mod"`, the fine-tuning script's choice, makes every layer but 0, 1, 2 and
  L-1 a MoD layer (`initialize_mod_modules`); an explicit list replaces it (`config.mod_layers`).
- One router `Linear(d, 2, bias=False)` shared by every MoD layer, fed each MoD layer's input-norm output
  `input_layernorm(h)`; `p = softmax(logits)[..., 1]` is a token's routing probability.
- Training (`MoDLlamaDecoderLayer_forward`): only the image and system-prompt tokens may be skipped (masked
  routing learning; the official code hard-codes the first 1024 + 35 positions, image then instruction
  tokens); every question and answer token is always routed. Of a sample's R routable tokens, the
  ceil(R * capacity) with the highest p are routed (capacity 0.5: the code's
  `top_k = ceil(S * (1 - R * 0.5 / S))` over `p + mask`).
- A MoD layer runs for the routed tokens only and skips the others entirely: attention among the routed
  tokens, in their original order, with RoPE positions renumbered 0..k-1 (the code gathers them and passes
  `position_ids = arange(top_k)`); the MLP output is multiplied by p (which is how the router gets its
  gradient); both residuals as usual. Skipped tokens keep their hidden state; they are neither queries nor
  keys in that layer.
- Auxiliary loss, per MoD layer: cross entropy of the router logits against "was routed" (1 for the top-k,
  0 otherwise), averaged over every position of the batch; the model loss adds 0.01 x their sum.
- Inference (`MoDLlamaDecoderLayer_forward_inference`): no mask; a token is routed iff p > 0.005 (the
  prefill rule, `mod_threshold`). When generating with a KV cache, a single new token skips the layer iff
  p < 0.5 (`mod_decode_threshold`); the megatron forward never decodes that way, the HF export does.

Where this differs, and why:
- The router may have a bias (`mod_router_bias`, off by default as in the official code).
- `mod_skip="mlp"` (not the default) is a variant: attention runs for every token at its own position, only the
  MLP for the routed tokens (output x p); a skipped token then skips the MLP only.
- The routable span is computed per sample: the N image tokens, wherever the sample's image id put them (after
  the system header and `USER: ` in the authors' templates), plus the leading text tokens that equal the
  template's system header (`config.mod_system_prefix`), instead of a constant 1059 positions. A text-only
  sample has no routable image tokens.
- Weighting of the aux loss: the LM loss here is the mean over the global batch's label tokens (megatron's
  per-token loss, this trainer's convention); each micro-batch's aux term (coeff x the sum over its MoD
  layers) enters the objective averaged over the global batch's micro-batches, which is how the official
  code's per-micro-batch `loss + aux` averages it under gradient accumulation and data parallelism. As there,
  the cross entropy averages over every position of the micro-batch, padding included (padding is text, so
  always routed), so the aux value depends on how micro-batches are padded (PP pads a step to one length).

How it lives in megatron-core:
- Each decoder layer is a `GammaModLayer` (a TransformerLayer; `gamma_mod_layer_spec` swaps the class in the
  vanilla spec); those named by `config.mod_layer_indices` take the MoD path, the others are plain layers.
- The router is `VanillaLLaVAModel.mod_router` (`mod_router.weight` [2, d], `mod_router.bias` [2] when
  enabled), replicated over TP ranks. Every TP rank routes identically (same replicated input, same weight),
  so its gradient is identical across TP ranks and needs no all-reduce, like a norm weight.
- Pipeline parallelism: every model chunk (pipeline stage, virtual stage) holds a copy of the router, used by
  the chunk's MoD layers. Their gradients are summed over the chunks of a rank and over the pipeline group
  before the data-parallel reduction (`sync_router_grads`, run by `forward_backward`), so every copy takes the
  same step; copies start equal (`broadcast_router`), and the checkpoint stores the one of the first stage
  (the others are replicas). The grad norm counts only that copy (`param.shared` on the others).
- The routing mask reaches the layers through the decoder block's `context_mask` argument, which a
  decoder-only GPT never uses: it is passed to every layer and through megatron's activation recompute.
  The aux term enters the backward through an identity on the layer output whose backward injects the
  aux gradient (megatron's MoE does the same with MoEAuxLossAutoScaler), so it works on every stage.
- Transformer Engine spec: the input RMSNorm is fused into linear_qkv; the router then reads
  `rms_norm(h)` with that fused weight (written for it, not exercised on this CPU-only test setup).
- Checkpoints: the router is saved with the model (key `mod_router.weight`); the trainer records
  `checkpoint_record(config)` in himix.json (`train_state["gamma_mod"]`), and `config_overrides(record)` gives
  the TransformerConfig fields that rebuild the model (build_model(..., **overrides)).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

# The fields a checkpoint records (himix.json: train_state["gamma_mod"]) and the HF export reads.
RECORDED_FIELDS = ("mod_layers", "mod_capacity", "mod_aux_loss_coeff", "mod_threshold", "mod_decode_threshold",
                   "mod_router_bias", "mod_skip")


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)  # through megatron's DDP wrapper


def is_gamma_mod(chunk) -> bool:
    return getattr(_unwrap(chunk), "mod_router", None) is not None


def checkpoint_record(config) -> dict:
    """What a checkpoint records of a gamma-MoD model (JSON-able; `mod_layers` resolved, 0-based)."""
    record = {name: getattr(config, name) for name in RECORDED_FIELDS}
    record["mod_layers"] = list(config.mod_layer_indices)
    return record


def config_overrides(record: dict) -> dict:
    """TransformerConfig overrides that rebuild the gamma-MoD model a checkpoint record describes."""
    unknown = sorted(set(record) - set(RECORDED_FIELDS))
    if unknown:
        raise ValueError(f"gamma-MoD record has unknown field(s) {unknown}")
    out = dict(record, gamma_mod=True)
    if out.get("mod_layers") is not None:
        out["mod_layers"] = tuple(int(i) for i in out["mod_layers"])
    return out


# --- the router ------------------------------------------------------------------------------------------


class ModRouter(MegatronModule):
    """gamma-MoD's shared router, Linear(d, 2): logit 1 is "process this token"."""

    def __init__(self, config, copy_index: int = 0):
        super().__init__(config=config)
        d = config.hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(2, d, dtype=config.params_dtype, device=device))
        self.bias = (torch.nn.Parameter(torch.empty(2, dtype=config.params_dtype, device=device))
                     if config.mod_router_bias else None)
        if config.perform_initialization:  # torch.nn.Linear's own initialisation, as the official router has
            with torch.no_grad():
                torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                if self.bias is not None:
                    torch.nn.init.uniform_(self.bias, -1 / math.sqrt(d), 1 / math.sqrt(d))
        # 0 on the first model chunk of the first pipeline stage: the main copy. The others are replicas
        # (checkpoint) and are left out of the grad norm (megatron's `shared` attribute).
        self.copy_index = copy_index
        for p in self.parameters():
            p.shared = copy_index != 0
        self.aux_grad_scale = 1.0  # the gradient weight of one micro-batch's aux term, set per step
        self.in_checkpoint = True  # False while loading a checkpoint saved without a router
        self._aux = []  # this chunk's aux terms since the last pop (detached), for logging

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        if not self.in_checkpoint:
            return {}
        replica = (self.copy_index, parallel_state.get_tensor_model_parallel_rank(),
                   parallel_state.get_data_parallel_rank(with_context_parallel=True))
        return {prefix + name: ShardedTensor.from_rank_offsets(prefix + name, p, *sharded_offsets, replica_id=replica,
                                                               prepend_axis_num=len(sharded_offsets))
                for name, p in self.named_parameters(recurse=False)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.in_checkpoint:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # else: keep the fresh router; its keys are not expected (a checkpoint of the dense model)


def routers(chunks: Sequence[torch.nn.Module]) -> list[ModRouter]:
    return [_unwrap(c).mod_router for c in chunks if is_gamma_mod(c)]


@contextmanager
def router_absent(chunks: Sequence[torch.nn.Module]):
    """Load a checkpoint saved without a router (a dense vanilla model) into gamma-MoD chunks: the router is
    neither requested from it nor expected, and keeps its initialisation."""
    rs = routers(chunks)
    for r in rs:
        r.in_checkpoint = False
    try:
        yield
    finally:
        for r in rs:
            r.in_checkpoint = True


# --- routing ---------------------------------------------------------------------------------------------


def routed_tokens(probs: Tensor, routable: Optional[Tensor], *, training: bool, capacity: float,
                  threshold: float) -> Tensor:
    """[S, b] bool: the tokens a MoD layer processes, from the router probabilities p [S, b].

    Training: every token that is not routable, plus the ceil(R * capacity) routable ones with the highest p
    (R: the sample's routable count; ties go to the earlier position). Inference: p > threshold, no mask.
    `routable` [S, b] bool; None: nothing is routable (every token is processed).
    """
    if not training:
        return probs > threshold
    if routable is None:
        return torch.ones_like(probs, dtype=torch.bool)
    s = probs.shape[0]
    count = routable.sum(0)  # [b]
    keep = torch.ceil(count.double() * capacity - 1e-9).long()  # float capacity, exact ceil for exact products
    score = torch.where(routable, probs.float(), torch.full_like(probs, 2.0, dtype=torch.float))  # p < 2 always
    order = torch.sort(score, dim=0, descending=True, stable=True).indices  # [S, b]
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(s, device=probs.device)[:, None].expand_as(order))
    return rank < (s - count + keep)[None]


def routable_mask(input_ids: Tensor, vision_len: int, routable_text: Optional[Tensor]) -> Tensor:
    """[b, N + M] bool over vanilla's spliced sequence (model/vanilla.py: spliced_layout): the N image tokens of
    each sample that has an image, where its image id put them, and each sample's first routable_text[i]
    positions (the system header, which precedes the image id)."""
    from himix_megatron.data.templates import IMAGE_TOKEN_INDEX

    b, m = input_ids.shape
    positions = torch.arange(vision_len + m, device=input_ids.device)[None]
    slot = input_ids == IMAGE_TOKEN_INDEX
    start = slot.int().argmax(1, keepdim=True)
    mask = slot.any(1, keepdim=True) & (positions >= start) & (positions < start + vision_len)
    if routable_text is not None:
        mask |= positions < routable_text.to(device=input_ids.device, dtype=torch.long).view(b, 1)
    return mask


def system_prefix_lengths(input_ids: Tensor, prefix: Optional[Sequence[int]]) -> Optional[Tensor]:
    """[b]: len(prefix) where a sample's text starts with `prefix` (the system header), else 0."""
    if not prefix:
        return None
    n = len(prefix)
    if input_ids.shape[1] < n:
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    header = torch.tensor(list(prefix), dtype=input_ids.dtype, device=input_ids.device)
    return (input_ids[:, :n] == header).all(dim=1).long() * n


def system_header_ids(tokenizer, template: str, system: Optional[str] = None) -> tuple[int, ...]:
    """The token ids before the image slot of the first question: `<s>{system} USER: ` for the Vicuna-style
    templates, the system turn and user header for llama3_instruct / chatml, `<s>` for pretrain. Rendered as
    the template renders an image sample, so the cut is the template's own."""
    from himix_megatron.data.records import Conversation
    from himix_megatron.data.templates import TemplateConfig, encode_conversation

    cfg = TemplateConfig(template, image="mark", system=system)
    sample = Conversation(rounds=(("question", "answer"),), has_image=True, image_rounds=(0,))
    ids = encode_conversation(sample, tokenizer, cfg).ids
    return tuple(ids[: ids.index(cfg.image_token_index)])


class _AttachAux(torch.autograd.Function):
    """Identity on the layer output; its backward gives the aux term the gradient `scale` (megatron's
    MoEAuxLossAutoScaler pattern), so the aux loss trains on whichever pipeline stage computes it."""

    @staticmethod
    def forward(ctx, output: Tensor, aux: Tensor, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (aux,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux, ctx.scale), None


def _in_backward() -> bool:
    """Whether autograd is running a backward (activation recompute re-runs layers there)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _slice_rope(rotary_pos_emb, k: int):
    if rotary_pos_emb is None:
        return None
    if isinstance(rotary_pos_emb, tuple):
        return tuple(r[:k] for r in rotary_pos_emb)
    return rotary_pos_emb[:k]


class GammaModLayer(TransformerLayer):
    """A vanilla decoder layer, or a MoD layer when its (0-based) index is in `config.mod_layer_indices`."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.is_mod = (self.layer_number - 1) in config.mod_layer_indices
        self._router = ()  # (the model's ModRouter,): a reference, not a submodule (its parameters are the model's)

    @property
    def router(self) -> ModRouter:
        if not self._router:
            raise RuntimeError("a MoD layer needs the model's router (VanillaLLaVAModel attaches it)")
        return self._router[0]

    def forward(self, *args, **kwargs):
        if not self.is_mod:
            return super().forward(*args, **kwargs)
        kwargs.pop("dynamic_inference_decode_only", None)
        return self._mod_forward(*args, **kwargs)

    def _router_input(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(the input norm's output, which the router reads; what the self-attention takes)."""
        if not isinstance(self.input_layernorm, IdentityOp):
            x = self.input_layernorm(hidden)
            return x, x
        # Transformer Engine spec: the input RMSNorm is fused into linear_qkv, which normalises its own input.
        weight = self.self_attention.linear_qkv.layer_norm_weight
        if self.config.layernorm_zero_centered_gamma:
            weight = weight + 1
        return F.rms_norm(hidden, (hidden.shape[-1],), weight, self.config.layernorm_epsilon), hidden

    def _mod_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, context=None,
                     context_mask: Optional[Tensor] = None, rotary_pos_emb=None, rotary_pos_cos=None,
                     rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                     packed_seq_params=None, sequence_len_offset=None, padding_mask=None, **unused):
        if inference_context is not None or packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("a gamma-MoD layer runs unpacked training / forward-only evaluation without "
                                      "an inference context (generation is the HF export's)")
        config, router = self.config, self.router
        s, b, d = hidden_states.shape
        x, attention_input = self._router_input(hidden_states)
        logits = router(x)  # [S, b, 2]
        probs = torch.softmax(logits.float(), dim=-1)[..., 1]  # [S, b]
        routable = None if context_mask is None else context_mask.transpose(0, 1).bool()  # [S, b]
        chosen = routed_tokens(probs, routable, training=self.training, capacity=config.mod_capacity,
                               threshold=config.mod_threshold)
        count = chosen.sum(0)  # [b]
        k = int(count.max())
        self.last_routed = count.detach()  # tokens processed per sample, for inspection
        skip_layer = config.mod_skip == "layer"
        if not skip_layer:  # "mlp": the attention runs for every token, as in a plain layer
            hidden_states, _ = self._forward_attention(hidden_states, attention_mask=attention_mask,
                                                       rotary_pos_emb=rotary_pos_emb,
                                                       sequence_len_offset=sequence_len_offset)
        if k == 0:  # inference: the threshold skipped every token of the batch
            return hidden_states, context
        if k == s and bool(chosen.all()):  # every token routed: no gather
            order = index = None
            selected, selected_input, mask, rope = hidden_states, attention_input, attention_mask, rotary_pos_emb
            weights = probs
        else:
            # Routed tokens first, in their original order; a sample routing fewer than k tokens fills its
            # last slots with skipped ones ("pads"), which come after all its routed tokens (so the causal
            # mask hides them) and are written back unchanged.
            position = torch.arange(s, device=hidden_states.device)[:, None]
            order = torch.sort(torch.where(chosen, position, position + s), dim=0).indices[:k]  # [k, b]
            index = order[..., None].expand(k, b, d)
            selected = hidden_states.gather(0, index)
            weights = probs.gather(0, order)
            if skip_layer:
                selected_input = selected if attention_input is hidden_states else attention_input.gather(0, index)
                mask = None
                if attention_mask is not None:  # [b or 1, 1, S, S], True = masked: rows and columns of the routed
                    full = attention_mask[:, 0].expand(b, s, s)
                    rows = order.T  # [b, k]
                    mask = full.gather(1, rows[:, :, None].expand(b, k, s)).gather(2, rows[:, None, :].expand(b, k, k))
                    causal = torch.ones(k, k, dtype=torch.bool, device=mask.device).triu(1)
                    mask = (mask | causal)[:, None]
                rope = _slice_rope(rotary_pos_emb, k)  # positions renumbered 0..k-1, as the official code does
        hidden = selected
        if skip_layer:  # attention among the routed tokens only
            attention = self.self_attention(selected_input, attention_mask=mask, rotary_pos_emb=rope,
                                            sequence_len_offset=sequence_len_offset)
            hidden = self.self_attn_bda(self.training, config.bias_dropout_fusion)(attention, selected,
                                                                                   self.hidden_dropout)
        residual = hidden
        out, bias = self.mlp(self.pre_mlp_layernorm(hidden))
        if bias is not None:
            out = out + bias
        out = out * weights[..., None].to(out.dtype)  # the router's gradient path
        hidden = self.mlp_bda(self.training, config.bias_dropout_fusion)((out, None), residual, self.hidden_dropout)
        if order is None:
            output = hidden
        else:
            valid = torch.arange(k, device=hidden.device)[:, None] < count[None]  # [k, b]
            hidden = torch.where(valid[..., None], hidden, selected)
            output = hidden_states.scatter(0, index, hidden)
        if self.training:
            aux = config.mod_aux_loss_coeff * F.cross_entropy(logits.float().reshape(-1, 2), chosen.reshape(-1).long())
            if not _in_backward():  # activation recompute runs the layer again: count it once
                router._aux.append(aux.detach())
            if torch.is_grad_enabled():
                output = _AttachAux.apply(output, aux, router.aux_grad_scale)
        return output, context


def gamma_mod_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """The vanilla layer spec with GammaModLayer as its layer class (same submodules, same parameter names)."""
    return dataclasses.replace(spec, module=GammaModLayer)


def attach_router(model) -> ModRouter:
    """Give `model` (a gamma-MoD VanillaLLaVAModel chunk) its router copy and point its MoD layers at it."""
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    copy = parallel_state.get_pipeline_model_parallel_rank() + (model.vp_stage or 0) * pp
    router = ModRouter(model.config, copy_index=copy)
    for layer in model.decoder.layers:
        if isinstance(layer, GammaModLayer):
            layer._router = (router,)
    return router


# --- one training step -----------------------------------------------------------------------------------


def set_aux_grad_scale(chunks: Sequence[torch.nn.Module], microbatches) -> float:
    """Weigh every micro-batch's aux term so that the objective is LM loss + the aux terms averaged over the
    global batch's micro-batches. Collective over the data-parallel group under per-token loss.

    With megatron's per-token loss (the trainer's), gradients are summed over data parallelism and divided
    by the global label-token count T afterwards, so each aux term needs the weight T / (micro-batches x DP);
    otherwise each micro-batch's loss is divided by the micro-batch count and gradients averaged over DP.
    """
    from megatron.core import parallel_state

    from himix_megatron import platform

    config = _unwrap(chunks[0]).config
    n = len(microbatches)
    if config.calculate_per_token_loss:
        tokens = torch.stack([mb.loss_mask.sum().double() for mb in microbatches]).sum().to(platform.device())
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        dp = torch.distributed.get_world_size(group)
        if dp > 1:
            torch.distributed.all_reduce(tokens, group=group)
        scale = float(tokens) / (n * dp)
    else:
        scale = 1.0 / n
    if config.grad_scale_func is not None:  # fp16 loss scaling: the backward starts from a scaled loss
        scale *= float(config.grad_scale_func(torch.ones(1, device=platform.device())))
    for router in routers(chunks):
        router.aux_grad_scale = scale
    return scale


def _grad(param: torch.nn.Parameter) -> Tensor:
    if hasattr(param, "main_grad"):  # megatron DDP's buffer
        return param.main_grad
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def sync_router_grads(chunks: Sequence[torch.nn.Module]) -> None:
    """Sum the router copies' gradients over this rank's chunks and the pipeline group, into every copy.

    Runs before the data-parallel reduction (a sum, which commutes), so it is exact with or without the
    distributed optimizer; the trainer never overlaps the DP reduction with the backward under PP.
    """
    from megatron.core import parallel_state

    rs = routers(chunks)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp = torch.distributed.get_world_size(pp_group)
    if pp == 1 and len(rs) <= 1:
        return
    for name in ("weight", "bias"):
        grads = [_grad(getattr(r, name)) for r in rs if getattr(r, name) is not None]
        if not grads:
            continue
        total = torch.stack(grads).sum(0) if len(grads) > 1 else grads[0].clone()
        if pp > 1:
            torch.distributed.all_reduce(total, group=pp_group)
        for g in grads:
            g.copy_(total)


def with_router_sync(finalize):
    """`config.finalize_model_grads_func` that sums the router copies' gradients first."""

    def run(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        sync_router_grads(model)
        if finalize is not None:
            finalize(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)

    return run


@contextmanager
def training_step(chunks: Sequence[torch.nn.Module], microbatches):
    """Around one forward-backward of gamma-MoD chunks: the aux weights, then the router gradient sum."""
    config = _unwrap(chunks[0]).config
    set_aux_grad_scale(chunks, microbatches)
    finalize = config.finalize_model_grads_func
    config.finalize_model_grads_func = with_router_sync(finalize)
    try:
        yield
    finally:
        config.finalize_model_grads_func = finalize


def pop_aux_loss(chunks: Sequence[torch.nn.Module]) -> float:
    """The sum of the aux terms this rank's chunks computed since the last call (one per MoD layer and
    micro-batch, each already x coeff)."""
    total = 0.0
    for router in routers(chunks):
        if router._aux:
            total += float(torch.stack(router._aux).sum())
        router._aux = []
    return total


@torch.no_grad()
def broadcast_router(chunks: Sequence[torch.nn.Module]) -> None:
    """Make every router copy equal to the main one (first chunk of the first pipeline stage). Collective over
    the pipeline group; needed after a fresh initialisation, which differs per stage (per-rank seeds)."""
    from megatron.core import parallel_state

    rs = routers(chunks)
    if not rs:
        return
    for name in ("weight", "bias"):
        first = getattr(rs[0], name)
        if first is None:
            continue
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(first.data, src=parallel_state.get_pipeline_model_parallel_first_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
        for r in rs[1:]:
            getattr(r, name).data.copy_(first.data)
