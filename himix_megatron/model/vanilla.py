"""The vanilla LLaVA baseline on the same stack as HiMix (DESIGN.md section 1, issue 3 item 3).

    X_v [N, b, d_v] -> connector Linear(d_v, d) -> GELU -> Linear(d, d)        (LLaVA's mlp2x_gelu)
    text ids         = the template's image="mark" ids: one IMAGE_TOKEN_INDEX (-200) where the authors'
                       `tokenizer_image_token` puts the image (`<s> {system} USER: <IMG> \n {question} ...`)
    decoder input    = embed(text[:k]) ; connector(X_v) ; embed(text[k+1:])    [M-1+N, b, d]
    decoder          = megatron-core GPTModel, causal, RoPE positions 0.. over the spliced sequence

This is TinyLLaVA's / LLaVA's splice (transformers' LlavaForConditionalGeneration on the same ids with the image
id expanded to N image tokens gives the same logits). Each sample's sequence is followed by one spare position
(the slot token, moved to the end, where nothing attends to it), so a micro-batch is N + M long as before and
every length rule (pipeline shapes, sequence-parallel and FP8 multiples, packing budgets) is HiMix's plus N per
image. A text-only sample holds no image id: its text comes first and its (unused) image columns trail it,
so a mixed batch needs no mask. Loss and returned logits cover the M text positions: position t's output is
the decoder's at t before the image and t+N-1 after it; the slot's is the last image token's (it predicts the
token after the image; the template never trains the image id's label).

Why not megatron-core's `LLaVAModel`: its projector is built only together with its vision encoder
(`add_encoder=True`), so it cannot take the precomputed, frozen SigLIP features that HiMix consumes; it
splices the image at `image_token_index` as this model does, but returns (loss, loss_mask) over the combined
sequence, where HiMix returns loss over text only, and its splice needs a device sync per batch. It also asserts TE attention for SP/CP. This
model reuses its pieces instead: the same `MultimodalProjector` ("mlp" type, parameter names
`vision_projection.encoder.linear_fc{1,2}` as in LLaVAModel checkpoints) and GPTModel with
`scatter_embedding_sequence_parallel=False`, scattering after the concatenation, as LLaVAModel does.

Core attention is HiMix's: `SDPAttention` in megatron's local GPT spec, TEDotProductAttention in the TE
spec, so a benchmark of the two compares architectures, not kernels. The LM head runs at all N+M positions
(as in LLaVAModel and transformers' LLaVA, and as the paper's FLOPs count it); cross entropy runs on the
text positions only.

gamma-MoD (`config.gamma_mod`, model/gamma_mod.py) turns chosen decoder layers into mixture-of-depth layers
with one shared router, `mod_router`; everything else is this model unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor

from himix_megatron.config import HiMixTransformerConfig, LanguageModelConfig
from himix_megatron.data.packing import SegmentParams
from himix_megatron.data.templates import IMAGE_TOKEN_INDEX
from himix_megatron.model.common import (
    build_connector,
    check_packed_vision_features,
    check_vision_features,
    choose_spec,
    gpt_model_kwargs,
    present_flags,
)


def vanilla_layer_spec(use_te: bool) -> ModuleSpec:
    """megatron-core's GPT layer spec; on the local spec, core attention is HiMix's SDPAttention."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from himix_megatron.model.core_attention import SDPAttention

    gpt = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = gpt.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    )
    return dataclasses.replace(gpt, submodules=dataclasses.replace(gpt.submodules, self_attention=attention))


def spliced_layout(input_ids: Tensor, vision_tokens: int) -> tuple[Tensor, Tensor]:
    """Where the image goes in each sample's decoder sequence (no device sync).

    input_ids [b, M] with at most one IMAGE_TOKEN_INDEX per sample; N = vision_tokens (0: no image). Returns
    (order [N+M, b]: the index of each decoder position's input in cat([image (N rows), text (M rows)]);
     text_at [M, b]: the decoder position whose output is text position t's: t before the slot, t+N-1 after it,
     the slot itself the last image token, whose output predicts the token after the image, as in LLaVA).
    A sample with a slot at k: text[:k], image, text[k+1:], then the slot token (a trailing position that no
    other attends to; it keeps the sequence N + M long). A sample without one: its text, then the image.
    """
    b, m = input_ids.shape
    n = vision_tokens
    t = torch.arange(m, device=input_ids.device)[None]  # [1, M]
    if n == 0:
        return t.T.expand(m, b), t.T.expand(m, b)
    slot = input_ids == IMAGE_TOKEN_INDEX
    k = torch.where(slot.any(1), slot.int().argmax(1), m)[:, None]  # [b, 1]; M: no slot, the image trails
    image_at = k + torch.arange(n, device=input_ids.device)[None]  # [b, N]
    text_at = t + (n - 1) * (t >= k)
    text_dest = torch.where(t == k, n + m - 1, text_at)  # the slot token goes last
    order = torch.cat([image_at, text_dest], 1).argsort(1)  # the inverse of "source -> position"
    return order.T, text_at.T


def check_image_slots(input_ids: Tensor, vision_features: Optional[Tensor], flags: Optional[tuple]) -> None:
    """One image id per sample with an image, none elsewhere. Read only where the ids are on the CPU, so a GPU
    step never syncs for it: the loader's samples hold exactly that (the template's image="mark" ids, the image
    dropped where truncation cut its id off: data/loader.py; packed rows check it: data/packing.py's image_slot)."""
    if input_ids.is_cuda:
        return
    counts = (input_ids == IMAGE_TOKEN_INDEX).sum(1).tolist()
    if vision_features is None:
        expected = [0] * len(counts)
    else:
        expected = [1] * len(counts) if flags is None else [int(bool(v)) for v in flags]
    if counts != expected:
        raise ValueError(f"input_ids hold {counts} image ids ({IMAGE_TOKEN_INDEX}) per sample, expected {expected}: "
                         "vanilla LLaVA takes one where each sample's image goes (the template's image='mark' "
                         "ids) and none in a sample without an image (vision_features / image_present)")


class VanillaLLaVAModel(GPTModel):
    """Same interface as HiMixModel: text ids/labels [b, M], X_v [N, b, d_v]; loss (or logits) [b, M(, V)]."""

    vision_on_every_stage = False  # the connector output enters the sequence on the first stage

    @staticmethod
    def decoder_sequence_length(text_len: int, vision_len: int) -> int:
        return vision_len + text_len

    def __init__(self, config: HiMixTransformerConfig, lm: LanguageModelConfig, *, use_te: Optional[bool] = None,
                 pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
        self.use_te = choose_spec(config, use_te)
        spec = vanilla_layer_spec(self.use_te)
        if config.gamma_mod:
            from himix_megatron.model.gamma_mod import gamma_mod_layer_spec

            spec = gamma_mod_layer_spec(spec)
        super().__init__(
            transformer_layer_spec=spec,
            pre_process=pre_process,
            post_process=post_process,
            scatter_embedding_sequence_parallel=False,  # scattered after the image is spliced in
            vp_stage=vp_stage,
            **gpt_model_kwargs(config, lm),
        )
        self.vision_projection = None
        if pre_process:
            self.vision_projection = build_connector(config, self.use_te, self.pg_collection.tp)
        self.mod_router = None
        if config.gamma_mod:  # every chunk holds a copy (see gamma_mod.py: pipeline parallelism)
            from himix_megatron.model.gamma_mod import attach_router

            self.mod_router = attach_router(self)

    def forward(self, input_ids: Tensor, position_ids: Tensor, vision_features: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, image_present: Union[Tensor, Sequence[bool], None] = None,
                decoder_input: Optional[Tensor] = None, packed_seq_params: Optional[SegmentParams] = None,
                mod_routable_text: Optional[Tensor] = None) -> Tensor:
        """
        input_ids, position_ids, labels: [b, M] text with one IMAGE_TOKEN_INDEX per sample that has an image.
        vision_features: [N, b, d_v] raw encoder features, or None for a text-only batch (N = 0); later pipeline
            stages take None and learn N from the sequence they receive.
        image_present: optional per-sample flags ([b] bools); only checked against the image ids.
        packed_seq_params: a packed row (b = 1, data/packing.py, with `image_slots`); vision_features is then
            [N, images, d_v]; each segment is spliced as above, causal per segment, positions restarting.
        mod_routable_text: gamma-MoD, [b]: how many leading text tokens (the system prompt) MoD layers may skip
            in training, besides the image; default: those equal to config.mod_system_prefix.
        Returns per-token loss [b, M] when labels are given, else text logits [b, M, V].
        """
        if packed_seq_params is not None:
            if self.mod_router is not None:
                raise NotImplementedError("gamma-MoD does not take packed sequences")
            return self._packed_forward(input_ids, vision_features, labels, decoder_input, packed_seq_params)
        b, m = input_ids.shape
        if self.pre_process and decoder_input is None:
            check_image_slots(input_ids, vision_features, present_flags(image_present))
            n = 0 if vision_features is None else vision_features.shape[0]
            order, text_at = spliced_layout(input_ids, n)
            decoder_input = self.embedding(input_ids=input_ids.clamp(min=0), position_ids=position_ids)  # [M, b, d]
            if vision_features is not None:
                check_vision_features(vision_features, self.config.vision_hidden_size, b)
                image = self.vision_projection(vision_features.to(decoder_input.dtype))
                decoder_input = torch.cat([image, decoder_input], dim=0)
                decoder_input = decoder_input.gather(0, order[..., None].expand(-1, -1, decoder_input.shape[-1]))
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
            length = n + m
        else:  # a later pipeline stage: N from the length of the sequence it receives
            arriving = decoder_input if decoder_input is not None else self.decoder.input_tensor
            length = arriving.shape[0] * (self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
            n = length - m
            _, text_at = spliced_layout(input_ids, n)
        self._text_at = text_at
        extra = None
        if self.mod_router is not None and self.training:  # MoD routing mask (gamma_mod.py: context_mask)
            from himix_megatron.model.gamma_mod import routable_mask, system_prefix_lengths

            if mod_routable_text is None:
                mod_routable_text = system_prefix_lengths(input_ids, self.config.mod_system_prefix)
            extra = {"context_mask": routable_mask(input_ids, n, mod_routable_text)}
        output = super().forward(None, None, None, decoder_input=decoder_input, labels=labels,
                                 extra_block_kwargs=extra)
        if labels is None and self.post_process:
            return _take_text(output.transpose(0, 1), text_at).transpose(0, 1)
        return output

    def _packed_forward(self, input_ids, vision_features, labels, decoder_input, packed: SegmentParams) -> Tensor:
        if self.pre_process and decoder_input is None:
            text = self.embedding(input_ids=input_ids.clamp(min=0), position_ids=None)  # [T, 1, d]
            if vision_features is not None:
                check_packed_vision_features(vision_features, self.config.vision_hidden_size, packed)
                if not input_ids.is_cuda and packed.num_images and len(packed.image_slots) != len(packed.has_image):
                    raise ValueError("a packed row with images needs its segments' image_slots (where each image id "
                                     "sits: data/packing.py's pack_row gives them)")
                image = self.vision_projection(vision_features.to(text.dtype))  # [N, images, d]
                text = torch.cat([image.transpose(0, 1).reshape(-1, 1, image.shape[-1]), text])
            decoder_input = text[packed.kv_order]
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        self._text_at = packed.text_in_kv[:, None]
        output = super().forward(None, None, None, decoder_input=decoder_input, labels=labels,
                                 packed_seq_params=packed.square())
        if labels is None and self.post_process:
            return _take_text(output.transpose(0, 1), self._text_at).transpose(0, 1)
        return output

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        # logits [S, b, V] over the whole sequence: the loss covers its text positions only.
        return super().compute_language_model_loss(labels, _take_text(logits, self._text_at))


def _take_text(logits: Tensor, text_at: Tensor) -> Tensor:
    """logits [S, b, V] -> [M, b, V] at the decoder positions text_at [M, b]."""
    s, b = logits.shape[:2]
    rows = text_at * b + torch.arange(b, device=text_at.device)[None]
    return logits.reshape(s * b, -1).index_select(0, rows.reshape(-1)).view(*text_at.shape, -1)
