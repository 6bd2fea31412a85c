"""Encoded samples -> a training micro-batch in megatron's convention.

Megatron GPT models take inputs and next-token labels already shifted: `tokens[t]` is fed at position
t and `labels[t]` is the token to predict there (= ids[t + 1]). `loss_mask[t]` is 1 exactly where
that target was produced by the assistant. Masked labels hold IGNORE_INDEX (-100), so an unmasked
cross-entropy would also ignore them.

Padding goes on the right: with causal attention no real token attends to it, and it carries
loss_mask 0. `lengths` gives the number of real tokens per row. For vanilla LLaVA, `tokens` holds
IMAGE_TOKEN_INDEX (-200) where the model splices in the vision features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch

from himix_megatron.data.templates import IGNORE_INDEX


@dataclass(frozen=True)
class CollateConfig:
    seq_length: int
    pad_id: int
    # "seq_length": fixed shape, which pipeline-parallel p2p needs; "longest": shortest batch.
    pad_to: Literal["seq_length", "longest"] = "seq_length"
    pad_multiple: int = 1
    image_size: int = 384
    # Cached vision features instead of pixels (data/features.py): each image is then [N, d_v] of this dtype.
    feature_shape: Optional[tuple[int, int]] = None
    feature_dtype: Optional[torch.dtype] = None

    @property
    def image_shape(self) -> tuple:
        return self.feature_shape or (3, self.image_size, self.image_size)

    @property
    def image_dtype(self) -> torch.dtype:
        return self.feature_dtype or torch.float32


@dataclass
class Sample:
    """What a loader worker produces for one good sample."""

    ids: np.ndarray  # int64, at most seq_length + 1 tokens
    targets: np.ndarray  # bool, same length
    image: Optional[Union[np.ndarray, torch.Tensor]]  # float32 [3, S, S] or cached features [N, d_v]; None: none
    sample_id: str
    meta: dict = field(default_factory=dict)


def collate(samples: Sequence[Sample], cfg: CollateConfig) -> dict:
    b = len(samples)
    lengths = [len(s.ids) - 1 for s in samples]
    if any(n > cfg.seq_length for n in lengths):
        raise ValueError(f"a sample has {max(lengths)} tokens, more than seq_length={cfg.seq_length}")
    width = cfg.seq_length
    if cfg.pad_to == "longest":
        width = -(-max(lengths) // cfg.pad_multiple) * cfg.pad_multiple
    tokens = torch.full((b, width), cfg.pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    loss_mask = torch.zeros((b, width), dtype=torch.float32)
    shape = cfg.image_shape
    rows = []  # stacked once at the end: no zero-fill of the whole batch before copying into it
    has_image = torch.zeros(b, dtype=torch.bool)
    for row, s in enumerate(samples):
        n = lengths[row]
        ids = torch.from_numpy(np.asarray(s.ids, dtype=np.int64))
        mask = torch.from_numpy(np.asarray(s.targets[1:], dtype=bool))
        tokens[row, :n] = ids[:-1]
        labels[row, :n] = torch.where(mask, ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
        loss_mask[row, :n] = mask.float()
        if s.image is not None:
            image = torch.as_tensor(s.image)
            if tuple(image.shape) != shape:
                raise ValueError(f"sample {s.sample_id}: image shape {tuple(image.shape)}, expected {shape}")
            rows.append(image)
            has_image[row] = True
        else:
            rows.append(torch.zeros(shape, dtype=cfg.image_dtype))  # text-only: has_image False; the model adds no vision keys
    images = torch.stack(rows)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "images": images,
        "has_image": has_image,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "ids": [s.sample_id for s in samples],
        "meta": [s.meta for s in samples],
    }
