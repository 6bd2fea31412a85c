"""Tiny HiMix models and the bookkeeping to compare them across tensor-parallel sizes."""

from __future__ import annotations

import torch

from himix_megatron.config import (
    ParallelConfig,
    build_transformer_config,
    language_model_preset,
    vision_model_preset,
)

TINY_LM = language_model_preset("tiny")
TINY_VISION = vision_model_preset("tiny")


def build_tiny(arch: str = "himix", parallel: ParallelConfig = ParallelConfig(), lm=TINY_LM, seed: int = 0,
               **overrides):
    """A tiny decoder of any arch with seeded weights."""
    from megatron.core import tensor_parallel

    from himix_megatron.model import model_class

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    config = build_transformer_config(lm, TINY_VISION, parallel, arch=arch, use_cpu_initialization=True, **overrides)
    return model_class(arch)(config, lm)


def build_tiny_himix(parallel: ParallelConfig = ParallelConfig(), lm=TINY_LM, seed: int = 0, **overrides):
    return build_tiny("himix", parallel, lm, seed, **overrides)


def tiny_batch(batch: int = 2, text_len: int = 8, seed: int = 1, lm=TINY_LM, image_slot=None):
    """(tokens, positions, X_v, labels); `image_slot`: the position of every sample's image id (vanilla LLaVA's
    text holds one, data/templates.py image="mark"), whose label (the previous position's) becomes 0, as
    training's clamped IGNORE_INDEX."""
    from himix_megatron.data.templates import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, lm.vocab_size, (batch, text_len + 1), generator=g)
    vision = torch.randn(TINY_VISION.num_features, batch, TINY_VISION.hidden_size, generator=g)
    positions = torch.arange(text_len).expand(batch, text_len)
    labels = tokens[:, 1:].clone()
    if image_slot is not None:
        tokens[:, image_slot] = IMAGE_TOKEN_INDEX
        if image_slot > 0:
            labels[:, image_slot - 1] = 0
    return tokens[:, :-1], positions, vision, labels


def vanilla_slot(arch: str, at: int = 2):
    """Where tiny_batch puts the image id for `arch`: vanilla's text holds one, the other archs' none."""
    return at if arch == "vanilla" else None


def _is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def shard(name: str, full: torch.Tensor, param: torch.nn.Parameter, rank: int, size: int) -> torch.Tensor:
    """The slice of a TP=1 tensor that TP rank `rank` of `size` holds."""
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return full
    dim = param.partition_dim
    if _is_gated_fc1(name):  # SwiGLU fc1 is [gate; up]; each rank holds [gate_r; up_r]
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)], dim=0)
    return full.chunk(size, dim=dim)[rank]


def load_shards(model: torch.nn.Module, weights: dict) -> None:
    """Copy into `model` this TP rank's slice of each TP=1 tensor in `weights` (keyed by parameter name)."""
    from megatron.core import parallel_state

    rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(shard(name, weights[name], param, rank, size))


def unshard(name: str, pieces: list[torch.Tensor], param: torch.nn.Parameter) -> torch.Tensor:
    """Inverse of `shard`: the TP=1 tensor from every rank's piece."""
    if not getattr(param, "tensor_model_parallel", False) or len(pieces) == 1:
        return pieces[0]
    if _is_gated_fc1(name):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in pieces))
        return torch.cat([torch.cat(gates), torch.cat(ups)])
    return torch.cat(pieces, dim=param.partition_dim)


def gather_tp(name: str, tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(size)]
    torch.distributed.all_gather(pieces, tensor.contiguous(), group=group)
    return unshard(name, pieces, param)


def global_names(chunk) -> dict:
    """chunk-local parameter name -> (the name the same tensor has in the single-rank model, parameter)."""
    names = {}
    for name, param in chunk.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
        names[name] = (".".join(parts), param)
    return names


def build_rank_chunks(arch: str, parallel: ParallelConfig, weights: dict | None = None) -> list:
    """This rank's seeded model chunks, loaded with `weights` (single-rank names) when given."""
    from megatron.core import parallel_state, tensor_parallel

    from himix_megatron.model import model_class
    from himix_megatron.parallel.pipeline import build_model_chunks

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    config = build_transformer_config(TINY_LM, TINY_VISION, parallel, arch=arch, use_cpu_initialization=True)
    chunks = build_model_chunks(model_class(arch), config, TINY_LM)
    if weights is not None:
        tp_rank, tp_size = parallel_state.get_tensor_model_parallel_rank(), parallel.tensor_model_parallel_size
        with torch.no_grad():
            for chunk in chunks:
                for full_name, param in global_names(chunk).values():
                    param.copy_(shard(full_name, weights[full_name], param, tp_rank, tp_size))
    return chunks


def randomize(modules, seed: int, scale: float = 0.1) -> None:
    """Every tensor of `modules` random (one generator, in order), norm weights around 1, so a wrong name or a
    transposed fuse cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else scale * noise)


def randomize_hf(model, seed: int):
    """An HF model randomized (see `randomize`), in eval mode."""
    randomize([model], seed)
    return model.eval()


def set_model_field(iter_dir: str, key: str, value) -> None:
    """Rewrite one field of a checkpoint's model description (himix.json), keeping its manifest true."""
    import json
    import os

    path = os.path.join(iter_dir, "himix.json")
    with open(path) as f:
        meta = json.load(f)
    meta["model"][key] = value
    with open(path, "w") as f:
        json.dump(meta, f)
    with open(os.path.join(iter_dir, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["files"]["himix.json"] = os.path.getsize(path)
    with open(os.path.join(iter_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
