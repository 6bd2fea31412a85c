"""Pipeline parallelism for HiMix and the vanilla baseline, on megatron-core's schedules.

How X_v reaches every stage. Every HiMix layer reads the same vision features, so every pipeline stage
needs them, but the frozen encoder should run once per sample per pipeline. The first stage encodes
the images of all micro-batches of the step. One broadcast over the pipeline group then hands the
stacked features [micro-batches, N, b, d_v] to the later stages, before the 1F1B or interleaved
schedule starts. The features are detached (the encoder is frozen), so no gradient flows back.

Why not send X_v along with the activations: megatron-core's schedules move exactly one [M, b, d]
tensor per micro-batch between neighbouring stages, and X_v ([N, b, d_v], wider and usually longer)
would be relayed stage by stage. A collective issued outside the schedule cannot interleave with the
schedule's p2p traffic, so it cannot deadlock. Per micro-batch it costs N * b * d_v elements once over
the pipeline group: 728 x 1152 x 2 bytes = 1.68 MB per sample in bf16. For comparison, the activations
cost M * b * d per stage boundary, 64 x 4096 x 2 bytes = 0.5 MB per sample for Vicuna-7B at M = 64. The
price is holding every micro-batch's X_v for the step: 1.68 MB per sample.

The vanilla baseline needs X_v only on the first stage, where the connector turns it into the image
tokens of the sequence, so it skips the broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class MicroBatch:
    """One micro-batch of text (all stages) and images (first stage): tensors [b, M] / [b, ...]."""

    tokens: Tensor
    positions: Tensor
    labels: Tensor
    loss_mask: Tensor
    images: Optional[Tensor] = None  # what `encode` takes; only the first stage reads it
    image_present: Optional[Tensor] = None  # [b] bool; None means every sample has an image
    lengths: Optional[Tensor] = None  # [b] real (unpadded) text tokens, for throughput figures


def build_model_chunks(model_cls, config, lm, **kwargs) -> list[torch.nn.Module]:
    """This rank's model chunks: one per virtual pipeline stage, each knowing whether it embeds or predicts."""
    from megatron.core import parallel_state

    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        chunks.append(model_cls(
            config, lm,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
            **kwargs,
        ))
    return chunks


def share_vision_features(features: Optional[Tensor], shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Broadcast [micro-batches, N, b, d_v] from the first pipeline stage to the rest of the pipeline."""
    from megatron.core import parallel_state

    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if first and features is None:
        raise ValueError("the first pipeline stage must provide the vision features")
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return features
    if first:
        if tuple(features.shape) != tuple(shape):
            raise ValueError(f"vision features {tuple(features.shape)} != expected {tuple(shape)}")
        buffer = features.detach().to(dtype).contiguous()
    else:
        buffer = torch.empty(shape, dtype=dtype, device=torch.cuda.current_device())
    torch.distributed.broadcast(buffer, src=parallel_state.get_pipeline_model_parallel_first_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return buffer


def _label_token_loss(loss_mask: Tensor, per_token_loss: Tensor):
    """Megatron-core's three-value loss: the sum over label tokens and their count.

    With `config.calculate_per_token_loss` the schedule leaves the sum alone and finalize_model_grads
    divides the gradients by the global batch's token count (all-reduced over data parallel), so the
    loss is the mean over every label token of the global batch. Without it, the schedule divides by
    this micro-batch's count and the number of micro-batches: the mean of micro-batch means.
    """
    total = (per_token_loss * loss_mask).sum()
    tokens = loss_mask.sum().to(torch.int)
    # A copy for reporting: the schedule divides `total` in place.
    return total, tokens, {"stats": torch.stack([total.detach(), tokens.to(total.dtype)])}


def forward_backward(
    model_chunks: list[torch.nn.Module],
    microbatches: list[MicroBatch],
    encode: Callable[[Tensor], Tensor],
    *,
    vision_tokens: int,
    forward_only: bool = False,
    score: Optional[Callable[[MicroBatch, Tensor], tuple]] = None,
) -> Optional[Tensor]:
    """One step's forward and backward over `microbatches`.

    Returns [micro-batches, 2]: each micro-batch's summed label-token loss and its label-token count,
    on the last pipeline stage; None elsewhere. With `score` (evaluation, forward_only), the model
    returns logits instead and `score(mb, logits)` gives megatron-core's three-value loss-function
    result, whose dict holds a "stats" tensor; those are returned stacked instead.

    `encode(images) -> [N, b, d_v]` is called on the first pipeline stage only, once per micro-batch.
    Gradients accumulate in the chunks' parameters (or their DDP buffers), as megatron-core's schedules do.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = getattr(model_chunks[0], "module", model_chunks[0])  # through megatron's DDP wrapper
    config = model.config
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    b, m = microbatches[0].tokens.shape
    mixed = any(mb.image_present is not None and not bool(mb.image_present.all()) for mb in microbatches)
    if mixed and not model.vision_on_every_stage and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("vanilla LLaVA under pipeline parallelism needs every sample to have an image")
    features = None
    if first:
        with torch.no_grad():
            features = torch.stack([encode(mb.images) for mb in microbatches])
    if model.vision_on_every_stage:
        features = share_vision_features(
            features, (len(microbatches), vision_tokens, b, config.vision_hidden_size), config.pipeline_dtype
        )

    def forward_step(data_iterator, model):
        index, mb = next(data_iterator)
        vision = features[index] if features is not None else None
        if score is not None:
            return model(mb.tokens, mb.positions, vision, image_present=mb.image_present), partial(score, mb)
        output = model(mb.tokens, mb.positions, vision, labels=mb.labels, image_present=mb.image_present)
        return output, partial(_label_token_loss, mb.loss_mask)

    iterators = [iter(list(enumerate(microbatches))) for _ in model_chunks]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks,
        num_microbatches=len(microbatches),
        seq_length=model.decoder_sequence_length(m, vision_tokens),
        micro_batch_size=b,
        forward_only=forward_only,
    )
    return torch.stack([entry["stats"] for entry in losses]) if losses else None
