"""Sequence packing: several samples, each with its own image, in one row of text tokens.

HiMix keeps images out of the text sequence, so a packed row holds only text: segment i is sample i's
text t_i, and its queries attend over [v_i ; t_i], the vision keys of its own image followed by its own
causal text prefix (bottom-right aligned per segment), and nothing of any other segment. RoPE positions
restart at 0 in every segment. A row is a `thd` micro-batch of megatron-core (batch dimension 1):

    text (queries)   t_1 t_1 t_1 | t_2 t_2 | t_3 t_3 t_3 t_3 | pad      cu_seqlens_q  over text
    keys / values    v_1 .. v_1 t_1 t_1 t_1 | t_2 t_2 | v_3 .. t_3 | pad  cu_seqlens_kv over [v_i ; t_i]

`SegmentParams` is that description. It is made here, next to `collate`, travels in the micro-batch, and
is read by the core attention, and by the vanilla baseline, whose text holds one image id per image
(`image_slots`): its packed sequence is each segment's text with the slot replaced by connector(v_i), the
slot token itself moved to the segment's end (a position nothing attends to, which keeps every length as
HiMix's: m_i + N), e.g. [t_1[:k] ; connector(v_1) ; t_1[k+1:] ; slot ; t_2 ; ...]. Its lengths are also kept
as Python ints, so no kernel ever syncs with the device to learn them.

Which samples share a row (`plan_rows`): first-fit decreasing over `buffer_size` consecutive samples of
the rank's stream, rows of at most `seq_length` text tokens and `max_images` images. A row's cost is not
only its text: every image adds its vision K/V projections in every layer, its keys to every query of its
segment, and one encoder forward. For Vicuna-7B that is roughly 50 text tokens' worth of training compute
per image, and 12 MB of saved vision K/V per layer. Short captions would otherwise put dozens of images
into one row, so images per row are capped (`--packing-max-images`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from himix_megatron.data.collate import CollateConfig, Sample, collate
from himix_megatron.data.templates import IMAGE_TOKEN_INDEX

# Rows are padded to a multiple of this many text tokens by default (FP8 GEMMs need the row count to be a
# multiple of 8; 8 also keeps the number of distinct shapes small). Sequence parallelism needs 8 x TP.
ROW_MULTIPLE = 8


@dataclass(frozen=True)
class PackingConfig:
    seq_length: int  # text tokens per packed row (--packing-seq-length)
    buffer_size: Optional[int] = None  # samples considered at once; None: the whole group given to pack()
    max_images: Optional[int] = None  # images per row; None: no cap
    vision_tokens: int = 0  # N, vision tokens per image (the key layout needs it)
    row_multiple: int = ROW_MULTIPLE  # rows are padded to a multiple of this
    # Pipeline parallelism pads a step's rows to its longest (training/data.py): plan rows of similar length.
    even_rows: bool = False

    def __post_init__(self):
        for name in ("seq_length", "buffer_size", "max_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"PackingConfig.{name}={value} must be >= 1")


@dataclass
class SegmentParams(PackedSeqParams):
    """megatron-core's `thd` description of one packed row, plus what HiMix's attention needs.

    cu_seqlens_q: text offsets; cu_seqlens_kv: offsets in the key sequence [v_1; t_1; v_2; t_2; ...].
    """

    text_lengths: tuple = ()  # per segment, Python ints (the last segment may be padding)
    has_image: tuple = ()  # per segment
    vision_tokens: int = 0
    text_positions: Optional[Tensor] = None  # [T] position of each text token in its segment
    # Index of each key in cat([vision tokens of image 0, 1, ... (image-major), text tokens]).
    kv_order: Optional[Tensor] = None
    text_in_kv: Optional[Tensor] = None  # [T] where each text token lands in the key sequence
    # > 1: the segments are the rows of an unpacked [M, b] batch (one sample each, all of length M), attended
    # to as segments so that imageless samples get no vision keys without a mask (model/himix_model.py).
    batch_rows: int = 1
    # Vanilla LLaVA: per segment, where its image id (-200) sits in its text, or None; () when the text holds none.
    image_slots: tuple = ()

    @property
    def num_images(self) -> int:
        return sum(self.has_image)

    @property
    def seqlens_q(self) -> tuple:
        return self.text_lengths

    @property
    def seqlens_kv(self) -> tuple:
        return tuple(m + (self.vision_tokens if v else 0) for m, v in zip(self.text_lengths, self.has_image))

    def to(self, device) -> "SegmentParams":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, cu_seqlens_q=move(self.cu_seqlens_q), cu_seqlens_kv=move(self.cu_seqlens_kv),
                       text_positions=move(self.text_positions), kv_order=move(self.kv_order),
                       text_in_kv=move(self.text_in_kv))

    def square(self) -> PackedSeqParams:
        """The vanilla baseline's view: its sequence *is* the key sequence, causal per segment."""
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens_kv, cu_seqlens_kv=self.cu_seqlens_kv,
                               max_seqlen_q=self.max_seqlen_kv, max_seqlen_kv=self.max_seqlen_kv)


def _offsets(lengths: Sequence[int]) -> Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out


def segment_params(text_lengths: Sequence[int], has_image: Sequence[bool], vision_tokens: int,
                   batch_rows: int = 1, image_slots: Sequence[Optional[int]] = ()) -> SegmentParams:
    """The full description of a row whose segments have these text lengths and image flags; `image_slots`
    (vanilla): where each segment's image id sits in its text (None for a segment without an image)."""
    text_lengths, has_image = tuple(int(n) for n in text_lengths), tuple(bool(v) for v in has_image)
    if not text_lengths or min(text_lengths) < 1:
        raise ValueError(f"every segment needs at least one text token, got lengths {text_lengths}")
    if any(has_image) and vision_tokens < 1:
        raise ValueError("segments with an image need vision_tokens >= 1")
    image_slots = tuple(None if k is None else int(k) for k in image_slots)
    if image_slots and (len(image_slots) != len(text_lengths) or any(
            (k is not None) != v or (k is not None and not 0 <= k < m)
            for k, v, m in zip(image_slots, has_image, text_lengths))):
        raise ValueError(f"image_slots {image_slots}: one position inside its text per segment with an image, "
                         f"None for the others (lengths {text_lengths}, images {has_image})")
    n = vision_tokens
    vision_total = n * sum(has_image)
    order, text_in_kv, positions = [], [], []
    text_start, image, kv_len = 0, 0, 0
    for i, (m, v) in enumerate(zip(text_lengths, has_image)):
        text = torch.arange(vision_total + text_start, vision_total + text_start + m)
        slot = image_slots[i] if image_slots else None
        if slot is not None:  # [text before ; image ; text after ; the slot token]
            order += [text[:slot], torch.arange(image * n, (image + 1) * n), text[slot + 1:], text[slot:slot + 1]]
            at = torch.arange(m)
            text_in_kv.append(kv_len + at + (n - 1) * (at >= slot))  # the slot's output: the last image token's
            image += 1
            kv_len += n + m
            positions.append(at)
            text_start += m
            continue
        if v:
            order.append(torch.arange(image * n, (image + 1) * n))
            image += 1
            kv_len += n
        order.append(text)
        text_in_kv.append(torch.arange(kv_len, kv_len + m))
        positions.append(torch.arange(m))
        text_start += m
        kv_len += m
    kv_lengths = [m + (n if v else 0) for m, v in zip(text_lengths, has_image)]
    return SegmentParams(
        qkv_format="thd", cu_seqlens_q=_offsets(text_lengths), cu_seqlens_kv=_offsets(kv_lengths),
        max_seqlen_q=max(text_lengths), max_seqlen_kv=max(kv_lengths),
        text_lengths=text_lengths, has_image=has_image, vision_tokens=n,
        text_positions=torch.cat(positions), kv_order=torch.cat(order), text_in_kv=torch.cat(text_in_kv),
        batch_rows=batch_rows, image_slots=image_slots,
    )


def _first_fit(chunk: Sequence[int], lengths: Sequence[int], has_image: Sequence[bool], capacity: int, cap: int,
               rows: int = 0) -> list[list[int]]:
    """Samples by decreasing length (ties: stream order), each into the first of the open rows where it fits,
    else a new row. With `rows` > 0, that many rows start open and each sample goes to the *emptiest* row
    where it fits instead (longest-processing-time): rows of similar length."""
    free, images, members = [capacity] * rows, [0] * rows, [[] for _ in range(rows)]
    for i in sorted(chunk, key=lambda i: -lengths[i]):
        fits = [r for r in range(len(free)) if lengths[i] <= free[r] and images[r] + has_image[i] <= cap]
        if fits:
            r = max(fits, key=lambda r: (free[r], -r)) if rows else fits[0]
        else:
            r = len(free)
            free.append(capacity)
            images.append(0)
            members.append([])
        free[r] -= lengths[i]
        images[r] += bool(has_image[i])
        members[r].append(i)
    return [sorted(m) for m in members if m]


def plan_rows(lengths: Sequence[int], has_image: Sequence[bool], cfg: PackingConfig) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing within each buffer of consecutive samples.

    With `cfg.even_rows` (pipeline parallelism, where every row of a step is padded to the longest), the
    buffer's samples are spread instead over as many rows as first-fit needs, each to the emptiest row where it
    fits, so rows come out of similar length; the plan that makes the step's padded size (rows x longest row)
    smaller is kept. Deterministic (ties keep stream order); samples keep their stream order inside a row.
    """
    if len(lengths) != len(has_image):
        raise ValueError("plan_rows: lengths and has_image differ in length")
    too_long = [i for i, n in enumerate(lengths) if n > cfg.seq_length]
    if too_long:
        raise ValueError(f"a sample of {lengths[too_long[0]]} text tokens does not fit a packed row of "
                         f"--packing-seq-length {cfg.seq_length}")
    buffer = cfg.buffer_size or max(len(lengths), 1)
    cap = cfg.max_images or len(lengths) + 1
    rows: list[list[int]] = []
    for start in range(0, len(lengths), buffer):
        chunk = range(start, min(start + buffer, len(lengths)))
        planned = _first_fit(chunk, lengths, has_image, cfg.seq_length, cap)
        if cfg.even_rows and len(planned) > 1:
            even = _first_fit(chunk, lengths, has_image, cfg.seq_length, cap, rows=len(planned))
            padded = lambda plan: len(plan) * max(sum(lengths[i] for i in row) for row in plan)  # noqa: E731
            planned = even if padded(even) < padded(planned) else planned
        rows += planned
    return rows


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_row(samples: Sequence[Sample], collate_cfg: CollateConfig, vision_tokens: int,
             row_multiple: int = ROW_MULTIPLE) -> dict:
    """One packed row, as a micro-batch dict like `collate`'s with batch 1, plus `segments`; `lengths` holds
    each sample's text tokens.

    The row is padded to a multiple of `row_multiple` by a last, imageless segment of pad tokens that carries
    no loss: it attends only to itself, so it needs no special case in any attention backend (FlashAttention
    takes no padding between segments). Pipeline stages pad further with `extend_segments`. Samples whose text
    holds the image id (vanilla LLaVA) give the segments' `image_slots`.
    """
    parts = [collate([s], replace(collate_cfg, pad_to="longest", pad_multiple=1)) for s in samples]
    lengths = [int(p["lengths"][0]) for p in parts]
    real = sum(lengths)
    width = _round_up(real, row_multiple)
    flags = [bool(p["has_image"][0]) for p in parts]
    slots = [image_slot(p["tokens"][0], v, s.sample_id) for p, v, s in zip(parts, flags, samples)]
    slots = slots if any(k is not None for k in slots) else []
    seg_lengths, seg_images = list(lengths), list(flags)
    if width > real:
        seg_lengths.append(width - real)
        seg_images.append(False)
        slots += [None] * bool(slots)
    pad = width - real
    cat = lambda key, fill, dtype: torch.cat(  # noqa: E731
        [p[key][0] for p in parts] + [torch.full((pad,), fill, dtype=dtype)])[None]
    images = [p["images"][0] for p, v in zip(parts, flags) if v]
    shape = (0, *collate_cfg.image_shape)
    return {
        "tokens": cat("tokens", collate_cfg.pad_id, torch.long),
        "labels": cat("labels", -100, torch.long),
        "loss_mask": cat("loss_mask", 0.0, torch.float32),
        "images": torch.stack(images) if images else torch.empty(shape, dtype=collate_cfg.image_dtype),
        "has_image": torch.tensor(flags, dtype=torch.bool),
        "lengths": torch.tensor(lengths, dtype=torch.long),  # per sample: real text tokens
        "segments": segment_params(seg_lengths, seg_images, vision_tokens, image_slots=slots),
        "ids": [i for p in parts for i in p["ids"]],
        "meta": [m for p in parts for m in p["meta"]],
    }


def image_slot(tokens: Tensor, has_image: bool, sample_id: str) -> Optional[int]:
    """Where a sample's image id (vanilla LLaVA) sits in its input tokens; None without one. A sample holds at most
    one, and only with an image."""
    at = (tokens == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    if len(at) > 1 or (at and not has_image):
        raise ValueError(f"sample {sample_id}: {len(at)} image ids ({IMAGE_TOKEN_INDEX}) in its input tokens "
                         f"{'with' if has_image else 'without'} an image; a sample holds one per image, at most one")
    return at[0] if at else None


def pack(samples: Sequence[Sample], collate_cfg: CollateConfig, cfg: PackingConfig) -> list[dict]:
    """A group of samples (one step's share of a data-parallel rank) -> packed rows, in plan order."""
    lengths = [len(s.ids) - 1 for s in samples]
    rows = plan_rows(lengths, [s.image is not None for s in samples], cfg)
    return [pack_row([samples[i] for i in row], collate_cfg, cfg.vision_tokens, row_multiple=cfg.row_multiple)
            for row in rows]


def extend_segments(segments: SegmentParams, extra: int) -> SegmentParams:
    """The same row with `extra` more pad tokens at its end, as one more imageless segment."""
    return segment_params(segments.text_lengths + (extra,), segments.has_image + (False,), segments.vision_tokens,
                          image_slots=segments.image_slots + (None,) * bool(segments.image_slots))
