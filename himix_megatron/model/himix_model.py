"""The HiMix language decoder: megatron-core's GPTModel built from the HiMix layer spec.

Vision features reach every layer as the transformer block's `context`, which megatron-core already
threads through all layers, activation recompute included. The text sequence never contains image
tokens, so RoPE positions are the text positions 0..M-1 that GPTModel computes anyway.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from himix_megatron.config import ConfigError, HiMixTransformerConfig, LanguageModelConfig
from himix_megatron.model.core_attention import te_available
from himix_megatron.model.himix import himix_layer_spec


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron-LM's padding: a multiple of divisible_by * TP, so every TP shard is equal and aligned."""
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def mixture_attention_mask(text_len: int, vision_len: int, image_present: Tensor) -> Tensor:
    """Explicit [b, 1, M, N+M] mask (True = masked out) for batches where some samples lack an image.

    Causal over text, aligned bottom-right, and each imageless sample's vision columns masked.
    """
    keys = vision_len + text_len
    causal = torch.ones(text_len, keys, dtype=torch.bool, device=image_present.device).triu(vision_len + 1)
    mask = causal.expand(image_present.shape[0], 1, text_len, keys).clone()
    mask[~image_present.bool(), :, :, :vision_len] = True
    return mask


class HiMixModel(GPTModel):
    """Text tokens in, per-token loss (or logits) out; vision features [N, b, d_v] in every layer."""

    def __init__(self, config: HiMixTransformerConfig, lm: LanguageModelConfig, *, use_te: Optional[bool] = None,
                 pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
        self.use_te = te_available() if use_te is None else use_te
        if config.sequence_parallel and not self.use_te:
            raise ConfigError(
                "sequence_parallel needs the Transformer Engine spec (a GPU with transformer-engine): "
                "megatron-core's local RMSNorm does not support it"
            )
        super().__init__(
            config=config,
            transformer_layer_spec=himix_layer_spec(self.use_te),
            vocab_size=padded_vocab_size(lm.vocab_size, config.tensor_model_parallel_size),
            max_sequence_length=lm.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=lm.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=lm.rotary_base,
            rope_scaling=lm.rope_scaling_factor is not None,
            rope_scaling_factor=lm.rope_scaling_factor or 8.0,
            vp_stage=vp_stage,
        )

    def forward(self, input_ids: Tensor, position_ids: Tensor, vision_features: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, image_present: Optional[Tensor] = None,
                decoder_input: Optional[Tensor] = None) -> Tensor:
        """
        input_ids, position_ids, labels: [b, M] text only (no image placeholder).
        vision_features: [N, b, d_v] raw encoder features, or None for a text-only batch (N = 0).
        image_present: optional [b] bool; samples with False ignore the vision keys.
        Returns per-token loss [b, M] when labels are given, else logits.
        """
        attention_mask = None
        if vision_features is not None:
            self._check_vision_features(vision_features, input_ids, decoder_input)
            if image_present is not None and not bool(image_present.all()):
                text_len = input_ids.shape[1] if input_ids is not None else decoder_input.shape[0]
                attention_mask = mixture_attention_mask(text_len, vision_features.shape[0], image_present)
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            extra_block_kwargs={"context": vision_features},
        )

    def _check_vision_features(self, vision_features: Tensor, input_ids: Optional[Tensor],
                               decoder_input: Optional[Tensor]) -> None:
        expected_width = self.config.vision_hidden_size
        if vision_features.dim() != 3 or vision_features.shape[-1] != expected_width:
            raise ValueError(
                f"vision_features must be [N, b, d_v={expected_width}], got {tuple(vision_features.shape)}"
            )
        batch = input_ids.shape[0] if input_ids is not None else None
        if batch is not None and vision_features.shape[1] != batch:
            raise ValueError(
                f"vision_features batch {vision_features.shape[1]} != input_ids batch {batch} "
                "(vision_features is sequence-first: [N, b, d_v])"
            )
