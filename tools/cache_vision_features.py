"""Run the frozen vision encoder once over shard directories and store its features beside them.

    python tools/cache_vision_features.py --load ckpt/pretrain --data-path data/llava-558k [more dirs] \
        [--name siglip-so400m-384] [--dtype bfloat16] [--batch-size 32]
    torchrun --nproc-per-node 8 tools/cache_vision_features.py ... [--tensor-model-parallel-size 2]

The encoder comes from a himix checkpoint (`--load`, the one training starts from); its features go to
D/features/NAME/ for every --data-path D (layout: himix_megatron/data/features.py), one safetensors file per
shard. The shards are split over the data-parallel ranks; within a TP group every rank computes and the first
writes. Resumable: a shard's file appears only when complete (written to a temporary name, then renamed), and a
rerun skips shards that have one. features.json, written last by rank 0, makes the set usable:
`himix-train --vision-features NAME` then reads it instead of the images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_encoder(load: str, parallel):
    """The checkpoint's frozen encoder (local spec), loaded alone."""
    from himix_megatron.checkpoint import load_checkpoint, read_description
    from himix_megatron.model.vision import VisionEncoder, build_vision_config, vision_layer_spec
    from himix_megatron.parallel.encoder import encoder_placement
    from himix_megatron.platform import device

    vision = read_description(load).vision
    encoder = VisionEncoder(build_vision_config(vision, parallel, use_cpu_initialization=True), vision,
                            spec=vision_layer_spec(False), placement=encoder_placement(parallel.encoder_tp))
    load_checkpoint(load, [], encoder=encoder, load_rng=False)
    return encoder.to(device())


def cache_shard(encoder, reader, shard, image_cfg, dtype, batch_size: int, out_path) -> int:
    """Encode every readable sample of `shard` into `out_path` (None: compute only, for TP ranks that do not
    write); returns the number with an image."""
    from safetensors.torch import save_file

    from himix_megatron.data.image import load_and_preprocess

    n, d_v = encoder.vision.num_features, encoder.vision.hidden_size
    features = torch.zeros(shard.count, n, d_v, dtype=dtype)
    has_image = torch.zeros(shard.count, dtype=torch.uint8)
    keys, pending = [], []

    def flush():
        pixels = torch.stack([torch.from_numpy(p) for _, p in pending]).to(encoder.conv1.weight)
        out = encoder(pixels).transpose(0, 1).to("cpu", dtype)  # [b, N, d_v]
        for (i, _), f in zip(pending, out):
            features[i], has_image[i] = f, 1
        pending.clear()

    for i in range(shard.count):
        if i >= shard.readable:
            keys.append(None)  # lost in a truncated shard: the loader never reads it either
            continue
        sample = reader.read(shard, i)
        keys.append(sample.key)
        if sample.image is not None:
            pending.append((i, load_and_preprocess(sample.image, image_cfg, what=f"{shard.path} sample {i} image")))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    if out_path is None:
        return int(has_image.sum())
    tmp = out_path + ".tmp"
    save_file({"features": features, "has_image": has_image}, tmp, metadata={"ids": json.dumps(keys)})
    os.replace(tmp, out_path)
    return int(has_image.sum())


def main(argv=None) -> int:
    from himix_megatron.config import ParallelConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a himix checkpoint holding the vision encoder")
    p.add_argument("--data-path", nargs="+", required=True, help="shard directories (tools/build_shards.py)")
    p.add_argument("--name", help="the feature set's name (default: the encoder's preset name)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--image-aspect-ratio", default="resize", choices=("resize", "pad"),
                   help="as himix-train's flag of that name: the runs reading these features must use the same")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size} must be >= 1")

    from megatron.core import parallel_state
    from tqdm import tqdm

    from himix_megatron import platform
    from himix_megatron.data.features import DESCRIPTION, DTYPES, expected_description, feature_file, features_dir, \
        index_sha256, weights_sha256
    from himix_megatron.data.image import image_config_for
    from himix_megatron.data.shards import ShardDirectory, ShardReader

    platform.initialize(ParallelConfig(args.tensor_model_parallel_size))
    try:
        directories = [ShardDirectory.open(d) for d in args.data_path]
        encoder = load_encoder(args.load, ParallelConfig(args.tensor_model_parallel_size))
        name = args.name or encoder.vision.name
        image_cfg, dtype = image_config_for(encoder.vision, args.image_aspect_ratio), DTYPES[args.dtype]
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        writer = parallel_state.get_tensor_model_parallel_rank() == 0
        work = [(d, shard) for d in directories for shard in d.shards]
        mine = [(d, sh) for k, (d, sh) in enumerate(work) if k % dp == dp_rank
                and not os.path.isfile(os.path.join(features_dir(d.root, name), feature_file(sh.path)))]
        reader = ShardReader()
        rank0 = torch.distributed.get_rank() == 0
        bar = tqdm(total=sum(sh.count for _, sh in mine), disable=args.no_progress or not rank0, desc=name)
        for d, shard in mine:
            out_dir = features_dir(d.root, name)
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, feature_file(shard.path))
            # The TP group computes together; its first rank writes.
            cache_shard(encoder, reader, shard, image_cfg, dtype, args.batch_size, path if writer else None)
            bar.update(shard.count)
        bar.close()
        torch.distributed.barrier()
        description = expected_description(encoder.vision, image_cfg, args.dtype, encoder)
        # Of this rank's TP shards: comparable between runs at the same TP (training checks the fingerprint).
        description["encoder"].update(weights_sha256=weights_sha256(encoder),
                                      weights_sha256_tensor_parallel=args.tensor_model_parallel_size)
        if rank0:
            for d in directories:
                entry = dict(description, index_sha256=index_sha256(d.root), load=os.path.abspath(args.load),
                             shards={os.path.basename(sh.path): {"file": feature_file(sh.path), "count": sh.count}
                                     for sh in d.shards})
                path = os.path.join(features_dir(d.root, name), DESCRIPTION)
                with open(path + ".tmp", "w", encoding="utf-8") as f:
                    json.dump(entry, f, indent=1)
                os.replace(path + ".tmp", path)
                print(f"{features_dir(d.root, name)}: {len(d.shards)} shards, {d.num_samples} samples, "
                      f"{len(mine)} shard(s) computed by rank 0 in this run", flush=True)
        torch.distributed.barrier()
    finally:
        platform.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
