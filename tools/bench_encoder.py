#!/usr/bin/env python
"""The frozen encoder's share of a training step, and what caching its features saves, in one run (issue 15).

    python tools/bench_encoder.py [--vision-model siglip-so400m-384] [--vision-layers 27] [--micro-batches 2]

tools/bench.py's decoder (hidden 1024, 8 layers; megatron DDP + Adam, fp32) trains one finetune step of
`--micro-batches` samples of 64 text tokens, three ways:
  - HiMix from images: each micro-batch's image goes through the frozen SigLIP encoder (random weights, the
    preset's shape; `--vision-layers` fewer layers for a quicker look), then forward and backward;
  - HiMix from cached features: each micro-batch reads its bf16 [N, d_v] features from a safetensors file on
    disk (data/features.py's layout) instead;
  - vanilla from images, as the baseline.
Printed: each step's median time over `--repeats`, the encoder's share of the HiMix step from images, the
speedup from caching, and the end-to-end vanilla / HiMix ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _step(ddp, optimizer, tokens, positions, labels, features_of, micro_batches: int) -> tuple[float, float]:
    """(step seconds, of which encoding/reading the features)."""
    start, feature_time = time.perf_counter(), 0.0
    optimizer.zero_grad()
    ddp.zero_grad_buffer()
    for i in range(micro_batches):
        t0 = time.perf_counter()
        features = features_of(i)
        feature_time += time.perf_counter() - t0
        (ddp(tokens, positions, features, labels=labels).mean() / micro_batches).backward()
    ddp.finish_grad_sync()
    ok, _, _ = optimizer.step()
    assert ok, "optimizer step skipped"
    return time.perf_counter() - start, feature_time


def main(argv=None) -> int:
    import bench

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision-model", default="siglip-so400m-384")
    p.add_argument("--vision-layers", type=int, help="build the encoder with this many layers (default: the preset's)")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from safetensors import safe_open
    from safetensors.torch import save_file

    from himix_megatron import platform
    from himix_megatron.config import ParallelConfig, vision_model_preset
    from himix_megatron.model.vision import VisionEncoder, build_vision_config, vision_layer_spec

    platform.initialize(ParallelConfig())
    bench.keep_freed_memory()
    lm, _ = bench.models(bench.parse_args([]))
    vision = vision_model_preset(args.vision_model)
    if args.vision_layers:
        vision = dataclasses.replace(vision, num_layers=args.vision_layers)
    n, m, k = vision.num_features, args.text_tokens, args.micro_batches
    torch.manual_seed(0)
    encoder = VisionEncoder(build_vision_config(vision, ParallelConfig(), use_cpu_initialization=True), vision,
                            spec=vision_layer_spec(False))
    pixels = torch.randn(k, 1, 3, vision.image_size, vision.image_size)
    data = {arch: bench.batch(lm, vision, n, m, 1, "fp32", arch=arch) for arch in ("himix", "vanilla")}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shard-000000.safetensors")
        with torch.no_grad():
            cached = torch.stack([encoder(pixels[i])[:, 0] for i in range(k)]).to(torch.bfloat16)  # [k, N, d_v]
        save_file({"features": cached}, path)
        store = safe_open(path, framework="pt")

        def from_images(i):
            with torch.no_grad():
                return encoder(pixels[i])

        def from_cache(i):
            return store.get_slice("features")[i: i + 1].float().transpose(0, 1).contiguous()

        built = {"HiMix from images": (bench.build("himix", lm, vision, "fp32"), from_images),
                 "HiMix from cached features": (None, from_cache),
                 "vanilla from images": (bench.build("vanilla", lm, vision, "fp32"), from_images)}
        built["HiMix from cached features"] = (built["HiMix from images"][0], from_cache)
        times = {name: [] for name in built}
        features_times = {name: [] for name in built}
        for r in range(args.repeats + 1):  # the first round warms up (Adam's state)
            names = list(built)
            for name in names[r % 3:] + names[: r % 3]:
                (ddp, optimizer), features_of = built[name]
                tokens, positions, _, labels = data["vanilla" if name.startswith("vanilla") else "himix"]
                total, features = _step(ddp, optimizer, tokens, positions, labels, features_of, k)
                if r:
                    times[name].append(total)
                    features_times[name].append(features)
    platform.shutdown()
    med = {name: statistics.median(t) for name, t in times.items()}
    feat = {name: statistics.median(t) for name, t in features_times.items()}
    print(f"decoder hidden {lm.hidden_size} x {lm.num_layers} layers; encoder {vision.name} ({vision.num_layers} "
          f"layers, {n} x {vision.hidden_size} features); {k} micro-batches of 1 sample x {m} text tokens; "
          f"{torch.get_num_threads()} threads")
    for name in built:
        print(f"  {name:<28} step {med[name]:7.2f} s   (features {feat[name]:6.2f} s)")
    images, cached_t, vanilla = med["HiMix from images"], med["HiMix from cached features"], med["vanilla from images"]
    print(f"encoder share of the HiMix step from images: {feat['HiMix from images'] / images:.0%}; "
          f"of the vanilla step: {feat['vanilla from images'] / vanilla:.0%}")
    print(f"speedup from caching (HiMix): {images / cached_t:.2f}x")
    print(f"end to end, vanilla / HiMix: {vanilla / images:.2f}x from images, {vanilla / cached_t:.2f}x with "
          "HiMix on cached features")
    return 0


if __name__ == "__main__":
    sys.exit(main())
