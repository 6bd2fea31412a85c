"""The HiMix language decoder: megatron-core's GPTModel built from the HiMix layer spec.

Vision features reach every layer as the transformer block's `context`, which megatron-core already
threads through all layers, activation recompute included. The text sequence never contains image
tokens, so RoPE positions are the text positions 0..M-1 that GPTModel computes anyway.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from himix_megatron.config import ConfigError, HiMixTransformerConfig, LanguageModelConfig
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
from himix_megatron.model.himix import himix_layer_spec


def mixture_attention_mask(text_len: int, vision_len: int, flags: Sequence[bool], device=None) -> Tensor:
    """Explicit [b, 1, M, N+M] mask (True = masked out) for batches where some samples lack an image.

    Causal over text, aligned bottom-right, and each imageless sample's vision columns masked. `flags` are the
    per-sample image flags as Python bools (`present_flags`), so building the mask never waits for the GPU.
    """
    keys = vision_len + text_len
    causal = torch.ones(text_len, keys, dtype=torch.bool, device=device).triu(vision_len + 1)
    mask = causal.expand(len(flags), 1, text_len, keys).clone()
    absent = present_columns([not v for v in flags], mask.device)
    mask[absent, :, :, :vision_len] = True
    return mask


class HiMixModel(GPTModel):
    """Text tokens in, per-token loss (or logits) out; vision features [N, b, d_v] in every layer."""

    vision_on_every_stage = True  # every layer reads X_v, so every pipeline stage needs it

    @staticmethod
    def decoder_sequence_length(text_len: int, vision_len: int) -> int:
        return text_len  # the image never enters the sequence

    def __init__(self, config: HiMixTransformerConfig, lm: LanguageModelConfig, *, use_te: Optional[bool] = None,
                 pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
        self.use_te = choose_spec(config, use_te)
        if config.arch not in ("himix", "uniform", "hierarchical"):
            raise ConfigError(f"HiMixModel builds arch himix, uniform or hierarchical, not {config.arch!r}")
        if getattr(config, "cuda_graph_impl", "none") != "none" or getattr(config, "enable_cuda_graph", False):
            raise ConfigError("CUDA graphs are not supported: HiMix binds each call's X_v to the attention "
                              "module (HiMixTransformerLayer), which a captured graph would freeze")
        if config.arch != "himix" and config.gradient_accumulation_fusion:
            raise ConfigError(f"arch {config.arch!r} reads its vision K/V through the text QKV weight with a plain "
                              "matmul, whose gradient gradient_accumulation_fusion would drop (megatron's DDP "
                              "skips param.grad once the fused kernel wrote main_grad); turn the fusion off")
        if config.arch == "uniform" and config.pipeline_model_parallel_size > 1:
            raise ConfigError("arch 'uniform' shares one connector across all layers and does not support "
                              "pipeline parallelism (use 'hierarchical' or 'himix')")
        super().__init__(
            transformer_layer_spec=himix_layer_spec(self.use_te, config.arch),
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            **gpt_model_kwargs(config, lm),
        )
        # A batch where some samples lack an image: on TE, an explicit mask would send the whole micro-batch
        # to the unfused backend (scores [b x heads, M, N + M] materialised), so each sample becomes a segment
        # of its own, imageless ones with no vision keys, served by the flash / fused thd kernels. The local
        # spec keeps the one batched SDPA call with a mask, which is faster on CPU; both are exact.
        self.mixed_batches_as_segments = self.use_te
        # Fig. 4a: one connector whose output every layer reads through its own K/V projection.
        self.vision_projection = None
        if config.arch == "uniform":
            self.vision_projection = build_connector(config, self.use_te, self.pg_collection.tp)

    def forward(self, input_ids: Tensor, position_ids: Tensor, vision_features: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, image_present: Union[Tensor, Sequence[bool], None] = None,
                decoder_input: Optional[Tensor] = None, packed_seq_params: Optional[SegmentParams] = None) -> Tensor:
        """
        input_ids, position_ids, labels: [b, M] text only (no image placeholder).
        vision_features: [N, b, d_v] raw encoder features, or None for a text-only batch (N = 0).
        image_present: optional per-sample flags ([b] bools: a tuple, or a tensor); samples with False ignore
            the vision keys. Give the loader's CPU copy: a CUDA tensor costs a device sync (`present_flags`).
            When no sample has an image, vision_features is ignored (no vision keys at all).
        packed_seq_params: a packed row (b = 1, data/packing.py); vision_features is then [N, images, d_v],
            the images of its segments in order.
        Returns per-token loss [b, M] when labels are given, else logits.
        """
        attention_mask = None
        flags = present_flags(image_present) if packed_seq_params is None else None
        if vision_features is not None and flags is not None and not any(flags):
            # A micro-batch without images attends to text only: nothing may reach the vision K/V (TE's
            # RMSNorm rejects a zero-element input, MixtureAttention.vision_key_value asserts it).
            vision_features, flags = None, None
        if vision_features is not None:
            if packed_seq_params is not None:
                check_packed_vision_features(vision_features, self.config.vision_hidden_size, packed_seq_params)
            else:
                check_vision_features(vision_features, self.config.vision_hidden_size,
                                      input_ids.shape[0] if input_ids is not None else None)
            if flags is not None:
                if len(flags) != vision_features.shape[1]:
                    raise ValueError(f"image_present has {len(flags)} flags for {vision_features.shape[1]} samples")
                text_len = input_ids.shape[1] if input_ids is not None else decoder_input.shape[0]
                if self.mixed_batches_as_segments:
                    packed_seq_params = segment_params([text_len] * len(flags), flags, vision_features.shape[0],
                                                       batch_rows=len(flags)).to(vision_features.device)
                    vision_features = vision_features.index_select(1, present_columns(flags, vision_features.device))
                else:
                    attention_mask = mixture_attention_mask(text_len, vision_features.shape[0], flags,
                                                            vision_features.device)
            if self.vision_projection is not None:
                vision_features = self.vision_projection(vision_features)
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            packed_seq_params=packed_seq_params, extra_block_kwargs={"context": vision_features},
        )
