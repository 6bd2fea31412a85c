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
tokens of the sequence, so it skips the broadcast; later stages find the image's place from the image id in
the text ids every stage reads (a sample without an image holds none, so mixed micro-batches need nothing more).

gamma-MoD (model/gamma_mod.py) needs two things around a training step: the aux loss's gradient weight per
micro-batch, and the sum of the router copies' gradients over the stages; `forward_backward` does both.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from himix_megatron.data.packing import SegmentParams


@dataclass
class MicroBatch:
    """One micro-batch of text (all stages) and images (first stage): tensors [b, M] / [b, ...]."""

    tokens: Tensor
    positions: Tensor
    labels: Tensor
    loss_mask: Tensor
    images: Optional[Tensor] = None  # what `encode` takes; only the first stage reads it
    image_present: Optional[Tensor] = None  # [b] bool; None means every sample has an image
    # image_present as Python bools, taken while it is still on the CPU (the loader's copy), so the hot path
    # decides what to encode and how to attend without waiting for the GPU.
    image_flags: Optional[tuple] = None
    lengths: Optional[Tensor] = None  # real (unpadded) text tokens of each sample, for throughput figures
    # A packed row (b = 1, data/packing.py): its segments; `images` then holds one image per segment
    # that has one, [images, 3, S, S].
    segments: Optional[SegmentParams] = None

    def __post_init__(self):
        if self.image_flags is None and self.image_present is not None and self.image_present.device.type == "cpu":
            self.image_flags = tuple(bool(v) for v in self.image_present.tolist())

    def to(self, device) -> "MicroBatch":
        """The same micro-batch on `device` (copies issued non-blocking; `lengths` stays, it is bookkeeping)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.tokens), move(self.positions), move(self.labels), move(self.loss_mask),
                          move(self.images), move(self.image_present), self.image_flags, self.lengths,
                          None if self.segments is None else self.segments.to(device))

    @property
    def present(self) -> Optional[tuple]:
        """Which samples have an image, as Python bools; None when all do (or for a packed row). From the CPU
        copy; only a micro-batch built directly on the GPU pays a device sync here."""
        if self.image_present is None:
            return None
        if self.image_flags is None:
            self.image_flags = tuple(bool(v) for v in self.image_present.tolist())
        return None if all(self.image_flags) else self.image_flags

    @property
    def image_count(self) -> int:
        """Columns of this micro-batch's X_v: one per sample, or one per image of a packed row; 0 when no sample
        has an image (then neither the encoder nor any vision K/V runs)."""
        if self.segments is not None:
            return self.segments.num_images
        present = self.present
        return self.tokens.shape[0] if present is None or any(present) else 0


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


def share_vision_features(features: list[Optional[Tensor]], columns: Sequence[int], vision_tokens: int,
                          width: int, dtype: torch.dtype) -> list[Optional[Tensor]]:
    """Broadcast every micro-batch's X_v [N, columns_i, d_v] from the first pipeline stage to the others.

    One collective for the whole step: the features travel concatenated along the column dimension. Every
    stage reads the same samples, so each knows the column counts (samples, or a packed row's images)
    without asking. A micro-batch with no column (a packed row without images) has None.
    """
    from megatron.core import parallel_state

    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if first and any(f is None for f, n in zip(features, columns) if n):
        raise ValueError("the first pipeline stage must provide the vision features")
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return features
    total = sum(columns)
    if total == 0:
        return [None] * len(columns)
    if first:
        for f, n in zip(features, columns):
            if n and tuple(f.shape) != (vision_tokens, n, width):
                raise ValueError(f"vision features {tuple(f.shape)} != expected {(vision_tokens, n, width)}")
        buffer = torch.cat([f.detach().to(dtype) for f, n in zip(features, columns) if n], dim=1).contiguous()
    else:
        buffer = torch.empty((vision_tokens, total, width), dtype=dtype, device=torch.cuda.current_device())
    torch.distributed.broadcast(buffer, src=parallel_state.get_pipeline_model_parallel_first_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    parts = iter(buffer.split([n for n in columns if n], dim=1))
    return [next(parts) if n else None for n in columns]


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


def decoder_length(mb: MicroBatch, model, vision_tokens: int) -> int:
    """Positions the decoder runs for this micro-batch: what travels between pipeline stages."""
    text = mb.tokens.shape[1]
    if mb.segments is None:
        return model.decoder_sequence_length(text, vision_tokens)
    return model.decoder_sequence_length(text, vision_tokens * mb.segments.num_images)


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
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    lengths = {decoder_length(mb, model, vision_tokens) for mb in microbatches}
    if pipelined and len(lengths) > 1:
        raise ValueError(f"pipeline parallelism needs one decoder length per step, got {sorted(lengths)} "
                         "(training/data.py pads a step's micro-batches to a common length)")
    columns = [mb.image_count for mb in microbatches]
    features = [None] * len(microbatches)
    if first:
        with torch.no_grad():
            features = [encode(mb.images) if n else None for mb, n in zip(microbatches, columns)]
    if model.vision_on_every_stage:
        features = share_vision_features(features, columns, vision_tokens, config.vision_hidden_size,
                                         config.pipeline_dtype)

    def forward_step(data_iterator, model):
        index, mb = next(data_iterator)
        vision = features[index]
        kwargs = dict(image_present=mb.present if vision is not None else None, packed_seq_params=mb.segments)
        if score is not None:
            return model(mb.tokens, mb.positions, vision, **kwargs), partial(score, mb)
        output = model(mb.tokens, mb.positions, vision, labels=mb.labels, **kwargs)
        return output, partial(_label_token_loss, mb.loss_mask)

    iterators = [iter(list(enumerate(microbatches))) for _ in model_chunks]
    step = nullcontext()
    if getattr(config, "gamma_mod", False) and not forward_only:
        from himix_megatron.model import gamma_mod

        # The aux loss's weight per micro-batch, and the router copies' gradient sum over pipeline stages.
        step = gamma_mod.training_step(model_chunks, microbatches)
    with step:
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
            model=model_chunks,
            num_microbatches=len(microbatches),
            seq_length=max(lengths),
            micro_batch_size=microbatches[0].tokens.shape[0],
            forward_only=forward_only,
        )
    return torch.stack([entry["stats"] for entry in losses]) if losses else None
