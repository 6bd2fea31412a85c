#!/usr/bin/env python
"""Loader throughput: decode + preprocess + tokenize, on generated 384px JPEGs.

    python tools/bench_loader.py --samples 1024 --workers 1 2

Builds a temporary shard directory of JPEGs (smooth random scenes, quality 90) with LLaVA-style
conversations, trains a small sentencepiece model on the text, then reports:
- "inline": the per-sample pipeline in this process (one core, no DataLoader);
- for each worker count: the full ShardLoader (workers, batching, collation), samples/s in total and
  per worker.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image


def _scene(rng: np.random.Generator, w: int, h: int) -> bytes:
    low = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


WORDS = ("the a image shows person dog cat table street car tree sky building red blue green small large "
         "left right near behind holding sitting standing wearing white black window water").split()


def _text(rng, n):
    return " ".join(rng.choice(WORDS, n)).capitalize() + "."


def make_data(root: str, n: int, w: int, h: int, seed: int = 0) -> tuple[str, str]:
    from himix_megatron.data.build import BuildConfig, build_shards

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    records, corpus = [], []
    distinct = min(n, 256)  # decode cost does not depend on repeats; generation time does
    for i in range(distinct):
        with open(os.path.join(root, "images", f"{i}.jpg"), "wb") as f:
            f.write(_scene(rng, w, h))
    for i in range(n):
        q, a = _text(rng, 12), _text(rng, 60)
        corpus += [q, a]
        records.append({"id": str(i), "image": f"{i % distinct}.jpg",
                        "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(records, f)
    build_shards(BuildConfig(output=os.path.join(root, "shards"), json=(os.path.join(root, "data.json"),),
                             image_folder=os.path.join(root, "images"), maxcount=max(64, n // 4), progress=False))
    import sentencepiece as spm

    with open(os.path.join(root, "corpus.txt"), "w") as f:
        f.write("\n".join(corpus + ["A chat between a curious human and an artificial intelligence assistant. "
                                    "USER: ASSISTANT:"]))
    spm.SentencePieceTrainer.train(input=os.path.join(root, "corpus.txt"), model_prefix=os.path.join(root, "sp"),
                                   vocab_size=400, hard_vocab_limit=False, byte_fallback=True, minloglevel=2)
    return os.path.join(root, "shards"), os.path.join(root, "sp.model")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--source-size", default="384x384", help="WxH of the generated JPEGs")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--aspect-ratio", choices=("resize", "pad"), default="resize")
    p.add_argument("--micro-batch-size", type=int, default=8)
    args = p.parse_args(argv)

    import torch

    from himix_megatron.data import (DatasetSpec, ImageConfig, LoaderConfig, SampleEncoder, ShardLoader,
                                     TemplateConfig, load_tokenizer)
    from himix_megatron.data.shards import ShardDirectory, ShardReader

    torch.set_num_threads(1)
    w, h = (int(v) for v in args.source_size.split("x"))
    with tempfile.TemporaryDirectory() as root:
        shards, sp = make_data(root, args.samples, w, h)
        tok = load_tokenizer(sp)
        image = ImageConfig(size=args.image_size, aspect_ratio=args.aspect_ratio)
        template = TemplateConfig("tinyllama")
        print(f"{args.samples} samples, {w}x{h} JPEG -> {args.image_size}px ({args.aspect_ratio}), tinyllama, "
              f"{os.cpu_count()} CPUs visible")

        enc = SampleEncoder(tok, template, image, seq_length=2048)
        reader, d = ShardReader(), ShardDirectory.open(shards)
        t = time.perf_counter()
        n = 0
        for shard in d.shards:
            for j in range(shard.count):
                enc(reader.read(shard, j), "bench")
                n += 1
        rate = n / (time.perf_counter() - t)
        print(f"inline (1 core, no DataLoader): {rate:7.1f} samples/s")

        for workers in args.workers:
            cfg = LoaderConfig(datasets=(DatasetSpec.of(shards),), micro_batch_size=args.micro_batch_size,
                               seq_length=2048, template=template, image=image, num_workers=workers,
                               num_samples=args.samples, pad_to="longest")
            loader = ShardLoader(cfg, tok)
            it = iter(loader)
            next(it)  # worker start-up is not throughput
            start_pos, t = loader.position, time.perf_counter()
            for _ in it:
                pass
            n = loader.position - start_pos
            total = n / (time.perf_counter() - t)
            print(f"ShardLoader workers={workers}: {total:7.1f} samples/s total, {total / workers:7.1f} per worker")


if __name__ == "__main__":
    main()
