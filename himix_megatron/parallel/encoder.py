"""Where the frozen vision encoder runs under tensor parallelism: sharded, replicated, or in between.

Every rank of a tensor-parallel group of size T holds the same micro-batch and needs the whole X_v. Two ways
to get it, and everything between:
- **sharded** (E = T): one encoder split over the T ranks like the decoder. Each rank does 1/T of every GEMM,
  and every layer ends in two all-reduces of the full [s, b, d_v] activations (attention and MLP).
- **replicated** (E = 1): each rank holds the whole encoder and encodes 1/T of the micro-batch's images; one
  all-gather of the features [N, b/T, d_v] then gives every rank all of them.
- E ranks shard each of T / E copies; each copy encodes 1/(T/E) of the images.
`--encoder-tensor-model-parallel-size E` chooses. The arithmetic per rank is the same in every case when the
images split evenly; what differs is the communication (2 (L - 1) all-reduces of a copy's activations against
one all-gather of the copies' features), and how evenly a micro-batch of b images splits: a copy encodes
ceil(b / (T/E)) images, so an uneven split idles ranks. The trainer's default and its measurement: the
docs/parallelism.md, "Tensor parallelism: where the encoder runs" (tools/bench_encoder_placement.py).

Memory: a copy holds 1/E of the encoder (SigLIP-so400m: 0.8 GB in bf16 whole), and the encoder runs under
no_grad, so no activations outlive its forward.

Checkpoints hold the encoder in its unsharded shapes in every placement (megatron-core's sharded tensors are
global), so a checkpoint saved with any E loads with any other. The T / E copies are replicas, which
`mark_copies_as_replicas` tells dist_checkpointing (exactly one rank writes each tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class EncoderPlacement:
    """This rank's place among the encoder copies of its tensor-parallel group."""

    copies: int  # T / E: copies of the encoder in one tensor-parallel group
    copy_index: int  # which copy this rank belongs to (tensor-parallel rank // E)
    tp_group: Optional[dist.ProcessGroup] = None  # the E ranks sharding this copy; None: megatron's TP group
    gather_group: Optional[dist.ProcessGroup] = None  # this rank's counterparts in every copy, copy order
    gather_order: tuple[int, ...] = ()  # gather_group rank -> copy index

    @property
    def replicated(self) -> bool:
        return self.copies > 1


SHARDED = EncoderPlacement(copies=1, copy_index=0)


def encoder_placement(encoder_tp: int) -> EncoderPlacement:
    """Collective over the whole world (it creates process groups): every rank must call it, first pipeline
    stage or not, with the same `encoder_tp`. `encoder_tp` must divide the tensor-parallel size T."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp % encoder_tp:
        raise ValueError(f"encoder_tensor_model_parallel_size={encoder_tp} must divide "
                         f"tensor_model_parallel_size={tp}")
    if encoder_tp == tp:
        return SHARDED
    # Every rank needs every group's member list to create the groups in the same order.
    mine = dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
    tp_rank_order = [None] * dist.get_world_size()
    dist.all_gather_object(tp_rank_order, mine)  # each rank's TP group, in tensor-parallel rank order
    tp_groups = sorted({tuple(g) for g in tp_rank_order})
    copies = tp // encoder_tp
    shards = [list(g[c * encoder_tp:(c + 1) * encoder_tp]) for g in tp_groups for c in range(copies)]
    counterparts = [list(g[p::encoder_tp]) for g in tp_groups for p in range(encoder_tp)]
    tp_group, _ = dist.new_subgroups_by_enumeration(shards)
    gather_group, _ = dist.new_subgroups_by_enumeration(counterparts)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    # A process group ranks its members by global rank; the copy order is the tensor-parallel order.
    members = dist.get_process_group_ranks(gather_group)
    order = tuple(mine.index(r) // encoder_tp for r in members)
    return EncoderPlacement(copies, tp_rank // encoder_tp, tp_group, gather_group, order)


def encode_split(encode: Callable[[Tensor], Tensor], pixel_values: Tensor, placement: EncoderPlacement) -> Tensor:
    """`encode` over this copy's share of the images, then the features of all of them, [N, b, d_v], in order.

    The shares are contiguous and differ by at most one image (`tensor_split`); the all-gather needs equal
    sizes, so shorter shares are padded with zeros after encoding (padding costs no encoder work)."""
    shares = pixel_values.tensor_split(placement.copies)
    features = encode(shares[placement.copy_index])  # [N, b_i, d_v]
    longest = shares[0].shape[0]
    padded = features.new_zeros(features.shape[0], longest, *features.shape[2:])
    padded[:, :features.shape[1]] = features
    gathered = [torch.empty_like(padded) for _ in range(placement.copies)]
    dist.all_gather(gathered, padded, group=placement.gather_group)
    by_copy = dict(zip(placement.gather_order, gathered))
    return torch.cat([by_copy[c][:, :shares[c].shape[0]] for c in range(placement.copies)], dim=1)


def mark_copies_as_replicas(sharded_state_dict: dict, placement: EncoderPlacement) -> dict:
    """Number each copy's tensors as distinct replicas, so that only copy 0 of data-parallel rank 0 writes.

    megatron-core's replica_id is (0, tensor-parallel replica, data-parallel rank); inside a copy the first two
    are right already, and the copies differ only in what megatron sees as the data-parallel rank."""
    if not placement.replicated:
        return sharded_state_dict
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    def renumber(item):
        if isinstance(item, ShardedBase):
            *rest, dp_rank = item.replica_id if isinstance(item.replica_id, tuple) else (item.replica_id,)
            item.replica_id = (*rest, dp_rank * placement.copies + placement.copy_index)
        return item

    dict_list_map_inplace(renumber, sharded_state_dict)
    return sharded_state_dict
