"""The vanilla LLaVA baseline on the same stack as HiMix (DESIGN.md section 1, issue 3 item 3).

    X_v [N, b, d_v] -> connector Linear(d_v, d) -> GELU -> Linear(d, d)        (LLaVA's mlp2x_gelu)
    decoder input    = [connector(X_v) ; embed(text)]                          [N+M, b, d]
    decoder          = megatron-core GPTModel, causal over all N+M tokens, RoPE positions 0..N+M-1

The image sits in front of the text because the data pipeline moves the `<image>` placeholder to the front
of the first question (the LLaVA convention). Loss and returned logits cover the M text positions only.

Why not megatron-core's `LLaVAModel`: its projector is built only together with its vision encoder
(`add_encoder=True`), so it cannot take the precomputed, frozen SigLIP features that HiMix consumes; it
splices image embeddings at an `image_token_index` inside `input_ids` and returns (loss, loss_mask) over the
combined sequence, where HiMix returns loss over text only. It also asserts TE attention for SP/CP. This
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
from himix_megatron.data.packing import SegmentParams, segment_params
from himix_megatron.model.common import (
    build_connector,
    check_packed_vision_features,
    check_vision_features,
    choose_spec,
    gpt_model_kwargs,
    present_columns,
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


def vanilla_attention_mask(text_len: int, vision_len: int, flags: Sequence[bool], device=None) -> Tensor:
    """[b, 1, S, S] causal mask (True = masked out) where imageless samples' text ignores the image block.

    `flags`: per-sample image flags as Python bools (`present_flags`), so no device sync."""
    s = vision_len + text_len
    mask = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
    mask = mask.expand(len(flags), 1, s, s).clone()
    mask[present_columns([not v for v in flags], mask.device), :, vision_len:, :vision_len] = True
    return mask


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
            scatter_embedding_sequence_parallel=False,  # scattered after [image; text] is assembled
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
        # A batch where some samples lack an image: megatron's SelfAttention hands TE its spec's causal mask
        # type, so an explicit mask would be ignored there. On TE each sample becomes a segment of a packed
        # row instead ([image; text] or text alone), as HiMixModel does; the local spec keeps the mask.
        self.mixed_batches_as_segments = self.use_te

    def forward(self, input_ids: Tensor, position_ids: Tensor, vision_features: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, image_present: Union[Tensor, Sequence[bool], None] = None,
                decoder_input: Optional[Tensor] = None, packed_seq_params: Optional[SegmentParams] = None,
                mod_routable_text: Optional[Tensor] = None) -> Tensor:
        """
        input_ids, position_ids, labels: [b, M] text only (no image placeholder).
        vision_features: [N, b, d_v] raw encoder features, or None for a text-only batch (N = 0).
            Later pipeline stages need it (or a tensor of its shape) only when image_present is given.
        image_present: optional per-sample flags ([b] bools, best the loader's CPU copy: see HiMixModel).
        packed_seq_params: a packed row (b = 1, data/packing.py); vision_features is then [N, images, d_v] and
            the sequence is [connector(v_1); t_1; connector(v_2); t_2; ...], causal per segment, positions
            restarting in every segment.
        mod_routable_text: gamma-MoD, [b]: how many leading text tokens (the system prompt) MoD layers may skip
            in training, besides the image; default: those equal to config.mod_system_prefix.
        Returns per-token loss [b, M] when labels are given, else text logits [b, M, V].
        """
        if packed_seq_params is not None:
            if self.mod_router is not None:
                raise NotImplementedError("gamma-MoD does not take packed sequences")
            return self._packed_forward(input_ids, vision_features, labels, decoder_input, packed_seq_params)
        text_len = labels.shape[1] if labels is not None else input_ids.shape[1]
        flags = present_flags(image_present) if vision_features is not None else None
        if flags is not None and self.mixed_batches_as_segments:
            if self.mod_router is not None:
                raise NotImplementedError("gamma-MoD on the Transformer Engine spec needs every sample of a "
                                          "micro-batch to have an image (MoD routes within one sample's sequence)")
            return self._segments_forward(input_ids, vision_features, labels, decoder_input, flags)
        if self.pre_process and decoder_input is None:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [M, b, d]
            if vision_features is not None:
                check_vision_features(vision_features, self.config.vision_hidden_size, input_ids.shape[0])
                image = self.vision_projection(vision_features.to(decoder_input.dtype))
                decoder_input = torch.cat([image, decoder_input], dim=0)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        attention_mask = None
        if flags is not None:
            attention_mask = vanilla_attention_mask(text_len, vision_features.shape[0], flags, vision_features.device)
        self._text_positions = slice(-text_len, None)
        extra = None
        if self.mod_router is not None and self.training:  # MoD routing mask (gamma_mod.py: context_mask)
            from himix_megatron.model.gamma_mod import routable_mask, system_prefix_lengths

            length = (decoder_input if self.pre_process else self.decoder.input_tensor).shape[0]
            if mod_routable_text is None:
                mod_routable_text = system_prefix_lengths(input_ids, self.config.mod_system_prefix)
            extra = {"context_mask": routable_mask(input_ids.shape[0], length - text_len, text_len,
                                                   mod_routable_text, input_ids.device)}
        output = super().forward(None, None, attention_mask, decoder_input=decoder_input, labels=labels,
                                 extra_block_kwargs=extra)
        if labels is None and self.post_process:
            return output[:, self._text_positions]
        return output

    def _segments_forward(self, input_ids, vision_features, labels, decoder_input, flags) -> Tensor:
        """An unpacked [b, M] batch with imageless samples as one packed row of b segments: [image; text] for a
        sample with an image, its text alone otherwise (RoPE is relative, so a text-only segment's positions
        starting at 0 instead of N change nothing). Outputs come back as [b, M(, V)]."""
        if not self.pre_process or decoder_input is not None:
            raise NotImplementedError("vanilla LLaVA under pipeline parallelism needs every sample to have an image")
        b, m = input_ids.shape
        check_vision_features(vision_features, self.config.vision_hidden_size, b)
        if len(flags) != b:
            raise ValueError(f"image_present has {len(flags)} flags for {b} samples")
        segments = segment_params([m] * b, flags, vision_features.shape[0]).to(vision_features.device)
        features = None
        if any(flags):  # never an empty [N, 0, d_v] into the connector (TE rejects zero-element inputs)
            features = vision_features.index_select(1, present_columns(flags, vision_features.device))
        output = self._packed_forward(input_ids.reshape(1, b * m), features,
                                      None if labels is None else labels.reshape(1, b * m), None, segments)
        return output.reshape(b, m, *output.shape[2:])

    def _packed_forward(self, input_ids, vision_features, labels, decoder_input, packed: SegmentParams) -> Tensor:
        if self.pre_process and decoder_input is None:
            text = self.embedding(input_ids=input_ids, position_ids=None)  # [T, 1, d]
            if vision_features is not None:
                check_packed_vision_features(vision_features, self.config.vision_hidden_size, packed)
                image = self.vision_projection(vision_features.to(text.dtype))  # [N, images, d]
                text = torch.cat([image.transpose(0, 1).reshape(-1, 1, image.shape[-1]), text])
            decoder_input = text[packed.kv_order]
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        self._text_positions = packed.text_in_kv
        output = super().forward(None, None, None, decoder_input=decoder_input, labels=labels,
                                 packed_seq_params=packed.square())
        if labels is None and self.post_process:
            return output[:, self._text_positions]
        return output

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        # logits [S, b, V] over the whole sequence: the loss covers its text positions only.
        return super().compute_language_model_loss(labels, logits[self._text_positions])
