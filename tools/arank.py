#!/usr/bin/env python
"""ARank: each decoder layer's attention rank over a sample set, gamma-MoD's measure of layer redundancy.

    python tools/arank.py --load CKPT --data-path SHARDS [--num-samples 16] [--mod-count 28] [--json]

gamma-MoD (Luo et al., 2024) replaces the layers whose attention maps have the lowest rank by MoD layers.
Its official computation (Yaxin9Luo/Gamma-MOD, gamma_mod/model/language_model/llava_llama.py,
`compute_attention_rank`), matched here:
- per layer and per head, the softmax attention map of one sample over its whole sequence (image and text),
  lower-triangular (`torch.tril(ones) * attn`) with its diagonal zeroed (`masked_fill(eye, 0)`), in float32;
- its rank by `torch.linalg.matrix_rank` with the default tolerance: singular values above
  sigma_max x S x eps(float32);
- the layer's ARank is the mean over heads of those ranks (`--head-reduce ranks`, the official choice);
  `--head-reduce map` takes the rank of the head-averaged map instead.
The official script scores one sample at a time and prints each; here the ARank of each layer is the mean over
`--num-samples` samples with an image (text-only samples are skipped, as the official script skips them).

The layers it would choose for MoD: the `--mod-count` layers of lowest ARank (ties: the later layer first),
printed as a `--mod-layers` value for himix-train. gamma-MoD's own default (every layer but 0, 1, 2 and the
last) is what `--gamma-mod` uses without `--mod-layers`.

The model is the checkpoint's dense vanilla decoder (a gamma-MoD checkpoint's router is ignored: ARank is taken
on the model MoD layers are chosen for), run on one process (TP = PP = 1), one sample at a time. The maps are
recomputed from the queries and keys megatron's core attention receives (after RoPE), with the layer's own mask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEAD_REDUCTIONS = ("ranks", "map")


def attention_rank(attention: torch.Tensor, head_reduce: str = "ranks") -> float:
    """ARank of one sample's attention maps [heads, S, S] (softmax probabilities)."""
    if attention.dim() != 3 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be [heads, S, S], got {tuple(attention.shape)}")
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduce {head_reduce!r}: choose one of {HEAD_REDUCTIONS}")
    s = attention.shape[-1]
    below = torch.ones(s, s, dtype=torch.bool, device=attention.device).tril(-1)  # lower triangle, no diagonal
    maps = (attention * below).float()
    if head_reduce == "map":
        return float(torch.linalg.matrix_rank(maps.mean(0)))
    return float(torch.linalg.matrix_rank(maps).double().mean())  # per head, default tolerance; mean over heads


def choose_mod_layers(aranks: Sequence[float], count: int) -> list[int]:
    """The `count` layers of lowest ARank, in layer order (ties: the later layer is chosen first)."""
    if not 0 <= count <= len(aranks):
        raise ValueError(f"--mod-count {count} must be between 0 and the {len(aranks)} layers")
    order = sorted(range(len(aranks)), key=lambda i: (aranks[i], -i))
    return sorted(order[:count])


class AttentionRanks:
    """Forward pre-hooks on every layer's core attention: the ARank of each sample's maps, per layer."""

    def __init__(self, model, head_reduce: str = "ranks", spare: int = 0):
        self.head_reduce = head_reduce
        # Trailing positions left out of the maps: vanilla's spare one (its image id, moved behind the spliced
        # sequence, model/vanilla.py), which no other position attends to.
        self.spare = spare
        self.ranks: dict[int, list[float]] = {}  # 0-based layer -> one ARank per sample seen
        self.maps: dict[int, torch.Tensor] = {}  # the last batch's maps [b, heads, S, S], for inspection
        self.handles = []
        for layer in model.decoder.layers:
            core = layer.self_attention.core_attention
            self.handles.append(core.register_forward_pre_hook(self._hook(layer.layer_number - 1, core),
                                                               with_kwargs=True))

    def _hook(self, index: int, core):
        def hook(module, args, kwargs):
            query, key = args[0], args[1]
            mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
            if self.spare:
                s = query.shape[0] - self.spare
                query, key, mask = query[:s], key[:s], None if mask is None else mask[..., :s, :s]
            maps = attention_maps(query, key, mask, getattr(core, "softmax_scale", None))
            self.maps[index] = maps
            self.ranks.setdefault(index, []).extend(attention_rank(m, self.head_reduce) for m in maps)
        return hook

    def mean(self) -> list[float]:
        return [sum(self.ranks[i]) / len(self.ranks[i]) for i in sorted(self.ranks)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attention_maps(query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor],
                   scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention [b, heads, S, S] from megatron's q [S, b, heads, hn] and k [S, b, groups, hn];
    mask: True = masked out (megatron's convention), default causal."""
    s, heads, hn = query.shape[0], query.shape[2], query.shape[3]
    key = key.repeat_interleave(heads // key.shape[2], dim=2)  # GQA: each head's key group
    scores = torch.einsum("qbhd,kbhd->bhqk", query.float(), key.float()) * (scale or hn ** -0.5)
    if mask is None:
        mask = torch.ones(s, key.shape[0], dtype=torch.bool, device=query.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/arank.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="a checkpoint directory (himix-train --save) of a vanilla model")
    p.add_argument("--data-path", nargs="+", required=True, help="shard directories with the samples")
    p.add_argument("--num-samples", type=int, default=16, help="samples with an image to average over")
    p.add_argument("--mod-count", type=int, default=None,
                   help="how many MoD layers to choose (default: L - 4, as many as gamma-MoD's default)")
    p.add_argument("--head-reduce", choices=HEAD_REDUCTIONS, default="ranks",
                   help="ranks: mean over heads of each head's rank (official); map: rank of the head-mean map")
    p.add_argument("--seq-length", type=int, default=2048, help="tokens a sample keeps (the image counted as one)")
    p.add_argument("--tokenizer-model", default=None, help="default: the checkpoint's")
    p.add_argument("--template", default=None, help="default: the checkpoint's, else the paper's for the tokenizer")
    p.add_argument("--system-prompt", default=None, help="default: the checkpoint's (else the template's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args) -> dict:
    from himix_megatron import platform
    from himix_megatron.checkpoint import (
        build_model, checkpoint_tokenizer_dir, load_checkpoint, read_description, resolve)
    from himix_megatron.config import ConfigError, ParallelConfig
    from himix_megatron.data import ShardLoader
    from himix_megatron.data.templates import resolve_prompt
    from himix_megatron.training import data as training_data
    from himix_megatron.training.config import TrainConfig

    iter_dir = resolve(args.load)
    description = read_description(iter_dir)
    if description.arch != "vanilla":
        raise ConfigError(f"--load {args.load}: ARank is taken on a vanilla model's square attention maps; this "
                          f"checkpoint holds arch {description.arch}")
    if args.num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    platform.initialize(ParallelConfig())
    chunks, encoder = build_model(description, ParallelConfig(), use_cpu_initialization=not torch.cuda.is_available())
    load_checkpoint(iter_dir, chunks, encoder=encoder, load_rng=False)
    model = chunks[0].eval()
    layers = description.language.num_layers
    count = max(layers - 4, 0) if args.mod_count is None else args.mod_count
    tokenizer_dir = args.tokenizer_model or checkpoint_tokenizer_dir(iter_dir)
    if tokenizer_dir is None:
        raise ConfigError("--tokenizer-model is required (the checkpoint has no tokenizer files)")
    tokenizer = training_data.load_tokenizer_checked(tokenizer_dir, description.language)
    prompt = resolve_prompt(tokenizer, args.template, args.system_prompt, recorded_template=description.template,
                            recorded_system=description.system_prompt, where=iter_dir, warn=print)
    template = prompt.name
    cfg = TrainConfig(data_path=list(args.data_path), valid_data_path=list(args.data_path),
                      tokenizer_model=tokenizer_dir, template=template,
                      system_prompt=prompt.system_prompt, seq_length=args.seq_length, micro_batch_size=1,
                      train_iters=1, num_workers=0, arch="vanilla")
    loader = ShardLoader(training_data.loader_config(cfg, template, description.vision, valid=True),
                         tokenizer, rank=0, world_size=1)
    recorder = AttentionRanks(model, args.head_reduce, spare=1)  # one sample with an image at a time
    samples = 0
    with torch.no_grad():
        for batch in loader:
            mb = training_data.to_microbatch(batch).to(platform.device())
            if mb.images is None or (mb.image_present is not None and not bool(mb.image_present.all())):
                continue  # text-only: no image tokens to rank (the official script skips them too)
            model(mb.tokens, mb.positions, encoder(mb.images))
            samples += 1
            if samples == args.num_samples:
                break
    recorder.remove()
    if samples == 0:
        raise ConfigError(f"--data-path {' '.join(args.data_path)}: no sample with an image")
    aranks = recorder.mean()
    return {"aranks": aranks, "samples": samples, "head_reduce": args.head_reduce, "mod_count": count,
            "mod_layers": choose_mod_layers(aranks, count)}


def report(result: dict) -> str:
    lines = [f"ARank per layer (mean over {result['samples']} samples, head reduction: {result['head_reduce']})",
             "layer   ARank"]
    chosen = set(result["mod_layers"])
    for i, value in enumerate(result["aranks"]):
        lines.append(f"{i:5d}  {value:8.2f}" + ("   <- MoD" if i in chosen else ""))
    lines.append(f"the {result['mod_count']} layers of lowest ARank: --mod-layers "
                 + ",".join(str(i) for i in result["mod_layers"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    from himix_megatron.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except ConfigError as e:
        print(f"tools/arank.py: {e}", file=sys.stderr)
        return 2
    finally:
        from himix_megatron import platform

        platform.shutdown()
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
