#!/usr/bin/env python
"""Where the frozen encoder should run under tensor parallelism, measured side by side (issue 15).

    python tools/bench_encoder_placement.py [--vision-model siglip-so400m-384] [--vision-layers 8] \\
        [--tensor-model-parallel-size 2] [--images 1 2 4 8] [--repeats 3]

T ranks form one tensor-parallel group: on a GPU node, one GPU each (NCCL, the Transformer Engine spec when
installed), which is where the answer matters; elsewhere gloo ranks with one thread each. They encode the same
micro-batch of `--images` images with the preset's encoder (random weights; `--vision-layers` of its
layers, since every layer costs the same), once per placement of parallel/encoder.py:
  - sharded (E = T): one encoder split over the T ranks, two all-reduces per layer;
  - replicated (E = 1), and every E between: T / E copies, each encoding its share, one all-gather.
The placements alternate within each repeat, so both see the same machine state. Printed per image count:
each placement's median seconds per micro-batch, and sharded / that placement (above 1: faster than sharded).
The features of every placement are checked equal to the sharded ones before any timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _divisors(n: int) -> list[int]:
    return [e for e in range(n, 0, -1) if n % e == 0]  # sharded first


def _worker(rank: int, args, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.tensor_model_parallel_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import dataclasses

    from himix_megatron import platform
    from himix_megatron.config import ParallelConfig, vision_model_preset
    from himix_megatron.model.vision import VisionEncoder, build_vision_config, vision_layer_spec
    from himix_megatron.parallel.encoder import encoder_placement

    tp = args.tensor_model_parallel_size
    platform.initialize(ParallelConfig(tp))
    gpu = platform.gpu_enabled()
    if not gpu:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if gpu else torch.float32

    def synchronize():
        if gpu:
            torch.cuda.synchronize()
        torch.distributed.barrier()

    try:
        vision = vision_model_preset(args.vision_model)
        if args.vision_layers:
            vision = dataclasses.replace(vision, num_layers=args.vision_layers + 1)  # + the unbuilt last layer
        encoders = {}
        for e in _divisors(tp):
            parallel = ParallelConfig(tp, encoder_tensor_model_parallel_size=e)
            torch.manual_seed(0)  # use_cpu_initialization: each shard is a slice of the same full weights
            config = build_vision_config(vision, parallel, params_dtype=dtype, use_cpu_initialization=True)
            encoders[e] = VisionEncoder(config, vision, spec=vision_layer_spec(), placement=encoder_placement(e))
            encoders[e].to(platform.device(), dtype)
        times = {(e, b): [] for e in encoders for b in args.images}
        for b in args.images:
            pixels = torch.randn(b, 3, vision.image_size, vision.image_size,
                                 generator=torch.Generator().manual_seed(b)).to(platform.device())
            reference = encoders[tp](pixels)
            for e, encoder in encoders.items():
                error = (encoder(pixels) - reference).abs().max().item() / reference.abs().max().item()
                assert error < (2e-2 if gpu else 1e-4), \
                    f"E={e}, {b} images: features differ from the sharded encoder's by {error} (relative)"
            for _ in range(args.repeats):
                for e, encoder in encoders.items():
                    synchronize()
                    start = time.perf_counter()
                    encoder(pixels)
                    synchronize()
                    times[e, b].append(time.perf_counter() - start)
        if rank == 0:
            torch.save({k: statistics.median(v) for k, v in times.items()}, os.path.join(out_dir, "times.pt"))
    finally:
        platform.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision-model", default="siglip-so400m-384")
    p.add_argument("--vision-layers", type=int, default=8, help="encoder layers to build (0: the preset's)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=2)
    p.add_argument("--images", type=int, nargs="+", default=[1, 2, 4, 8], help="images per micro-batch")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)

    import torch.multiprocessing as mp

    from himix_megatron.config import vision_model_preset
    from himix_megatron.platform import free_port

    tp = args.tensor_model_parallel_size
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(args, free_port(), out_dir), nprocs=tp, join=True, start_method="spawn")
        times = torch.load(os.path.join(out_dir, "times.pt"))
    vision = vision_model_preset(args.vision_model)
    layers = args.vision_layers or vision.num_layers - 1
    where = "GPUs (bf16, NCCL)" if torch.cuda.is_available() else "gloo, one thread per rank (fp32)"
    print(f"{vision.name}: {layers} layers, width {vision.hidden_size}, {vision.num_features} features per image; "
          f"TP={tp} on {where}; median of {args.repeats}")
    names = {e: "sharded" if e == tp else "replicated" if e == 1 else f"E={e}" for e in _divisors(tp)}
    print(f"  {'images':>6}  " + "  ".join(f"{names[e] + ' (E=' + str(e) + ')':>18} {'':>7}" for e in names))
    for b in args.images:
        cells = [f"{times[e, b]:>16.3f} s {times[tp, b] / times[e, b]:>6.2f}x" for e in names]
        print(f"  {b:>6}  " + "  ".join(cells))
    print("x: sharded time / this placement's (above 1.00x: faster than sharding the encoder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
