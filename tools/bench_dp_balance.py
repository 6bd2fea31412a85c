#!/usr/bin/env python
"""Data-parallel load balance (himix_megatron/data/balance.py): the planner on a LLaVA-like mix at cluster
layouts, the cost of knowing every sample's length, and a real two-rank run with and without balancing.

    python tools/bench_dp_balance.py                     # ~3-5 min on a shared 2-core VM
    python tools/bench_dp_balance.py --skip-run          # (a) and the length cost only, seconds

Length mix: tools/bench_packing.py's LLaVA-665k-like mix (the same generator): 1/3 short captions of 20-60
text tokens, 5% text-only conversations and ~62% image conversations, log-normal (median ~320 tokens, 1-12
rounds) cut to 64-2048; overall median ~200, mean ~290, p99 ~1500. Printed as realised.

(a) Planner alone. For DP 8, 16, 32 and global batch 128, 256, --plan-steps global batches drawn from the mix;
each rank's cost is the sum of its samples' training FLOPs (`SampleCost`: flops.training_flops, finetune
stage, at Vicuna-7B's shapes with SigLIP so400m's 728 x 1152 features, plus the encoder's forward per image,
as the trainer counts them unless it reads cached features), for HiMix and for vanilla (each balanced for
what it computes). Imbalance = the heaviest rank's cost over the mean rank's, i.e. the step time over a
perfect split's when time follows FLOPs. Columns: round-robin (the loader without balancing), balanced with
equal sample counts per rank (what an unpacked schedule could use), balanced with unequal counts (what
packed training does). Mean and p90 over the steps.

Length cost. What every rank pays per step to know the step's lengths: reading a sample's json member and
tokenizing it (`ShardReader.read_record` + `SampleEncoder.text_length`), for every sample of the global batch;
against what a rank's loader pays per step anyway, reading and decoding its share (JPEGs of ~640x480 resized
to SigLIP's 384, as LLaVA's COCO images are). Both are measured here per sample, single process.

(b) A real run at DP=2: two gloo ranks of one thread each, the trainer's own loader path (ShardLoader with the
trainer's BalanceConfig), DDP, per-token loss, `trainer.train_step`, on shards of the same mix. The model is
tools/bench_packing.py's small decoder (hidden 256, 4 layers; fake frozen-encoder features of 728 x 1152), so
the plan's costs are its FLOPs, with no encoder term. The same global batches run balanced and round-robin,
step by step alternately (ABBA), after --warmup steps; rank 0 prints the median and total step times of both,
their ratio, and the ratio the planner predicts for those steps (sum of the heaviest rank's planned cost,
round-robin over balanced); then the median over steps of the same ratios step by step (step k is the same
global batch in both modes), which a burst of load from other processes moves less. Step time is the whole
step: forward-backward, the gradient all-reduce (where the lighter rank waits), the optimizer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_packing  # noqa: E402  (tools/bench_packing.py: the length mix, its data and its small model)
from himix_megatron.config import ParallelConfig, language_model_preset, vision_model_preset  # noqa: E402
from himix_megatron.data.balance import SampleCost, assign, imbalance, loads, round_robin  # noqa: E402
from himix_megatron.flops import vision_encoder_cost  # noqa: E402

LAYOUTS = ((8, 128), (8, 256), (16, 128), (16, 256), (32, 128), (32, 256))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan-steps", type=int, default=400, help="global batches drawn per layout in (a)")
    p.add_argument("--length-samples", type=int, default=64, help="samples timed for the length cost")
    p.add_argument("--global-batch", type=int, default=16, help="(b): samples per step at DP=2")
    p.add_argument("--steps", type=int, default=12, help="(b): timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="(b): untimed steps per mode first")
    p.add_argument("--seq-length", type=int, default=2048, help="longest sample and packed row")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-tokens", type=int, default=728, help="(b): N per image (a square minus one)")
    p.add_argument("--vision-width", type=int, default=1152, help="(b): d_v")
    p.add_argument("--arch", default="himix", choices=bench_packing.ARCHS, help="(b)'s model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-run", action="store_true", help="(a) and the length cost only")
    args = p.parse_args(argv)
    for name in ("plan_steps", "length_samples", "global_batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.global_batch % 2:
        p.error("--global-batch must be even (DP=2)")
    return args


def draw(n: int, seq_length: int, rng) -> tuple[list, list]:
    kinds = bench_packing.target_lengths(n, seq_length, rng)
    return [m for _, m in kinds], [k != "text" for k, _ in kinds]


# ------------------------------------------------------------------------------------------- (a) planner


def planner_table(args) -> list[dict]:
    lm, vision = language_model_preset("vicuna-7b"), vision_model_preset("siglip-so400m-384")
    encoder = vision_encoder_cost(vision).feature_flops
    rows = []
    for arch in ("himix", "vanilla"):
        cost = SampleCost(lm, arch, vision.num_features, vision.hidden_size, "finetune", encoder_flops=encoder)
        for dp, gbs in LAYOUTS:
            rng = np.random.default_rng(args.seed + dp * 1000 + gbs)
            out = {"arch": arch, "dp": dp, "gbs": gbs, "round-robin": [], "equal": [], "balanced": []}
            for _ in range(args.plan_steps):
                lengths, images = draw(gbs, args.seq_length, rng)
                costs = [cost(m, v) for m, v in zip(lengths, images)]
                out["round-robin"].append(imbalance(loads(costs, round_robin(gbs, dp))))
                out["equal"].append(imbalance(loads(costs, assign(costs, dp, equal_counts=True))))
                out["balanced"].append(imbalance(loads(costs, assign(costs, dp))))
            rows.append(out)
    return rows


def print_planner(rows, args) -> None:
    lm, vision = language_model_preset("vicuna-7b"), vision_model_preset("siglip-so400m-384")
    per_token = SampleCost(lm, "himix", 728, 1152, "finetune")(301, False) - SampleCost(lm, "himix", 728, 1152,
                                                                                          "finetune")(300, False)
    for arch in ("himix", "vanilla"):
        cost = SampleCost(lm, arch, 728, 1152, "finetune", encoder_flops=vision_encoder_cost(vision).feature_flops)
        image = cost(250, True) - cost(250, False)
        print(f"\n(a) planner, {arch} Vicuna-7B + SigLIP so400m (finetune FLOPs; an image at 250 text tokens = "
              f"{image / per_token:.0f} text-token equivalents), {args.plan_steps} steps per layout; "
              "imbalance = heaviest rank / mean rank, mean (p90)")
        print(f"{'DP':>4} {'global batch':>12} {'samples/rank':>12} | {'round-robin':>14} | {'balanced, equal':>15} | "
              f"{'balanced, unequal':>17}")
        for r in rows:
            if r["arch"] != arch:
                continue
            cell = lambda k: f"{statistics.mean(r[k]):.3f} ({np.percentile(r[k], 90):.3f})"  # noqa: E731
            print(f"{r['dp']:>4} {r['gbs']:>12} {r['gbs'] // r['dp']:>12} | {cell('round-robin'):>14} | "
                  f"{cell('equal'):>15} | {cell('balanced'):>17}")


# ------------------------------------------------------------------------------------------ length cost


def jpeg(rng, size=(640, 480)) -> bytes:
    """A photo-sized JPEG: smooth gradients plus noise (~COCO's file size at quality 90)."""
    import io

    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 128 / (w + h)], -1)
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def length_cost(args, root: str) -> dict:
    import json

    from himix_megatron.data import ImageConfig, TemplateConfig, load_tokenizer
    from himix_megatron.data.build import BuildConfig, build_shards
    from himix_megatron.data.loader import SampleEncoder
    from himix_megatron.data.shards import ShardDirectory, ShardReader

    rng = np.random.default_rng(args.seed + 7)
    tok_dir = bench_packing.write_tokenizer(os.path.join(root, "tokenizer"))
    folder = os.path.join(root, "photos")
    os.makedirs(folder, exist_ok=True)
    records = []
    for i, (kind, length) in enumerate(bench_packing.target_lengths(args.length_samples, args.seq_length, rng)):
        rec = {"id": f"p{i}", "conversations": bench_packing.conversation(kind, length, rng)}
        if kind != "text":
            rec["image"] = f"{i}.jpg"
            with open(os.path.join(folder, rec["image"]), "wb") as f:
                f.write(jpeg(rng))
        records.append(rec)
    path = os.path.join(root, "photos.json")
    with open(path, "w") as f:
        json.dump(records, f)
    shards = os.path.join(root, "photo-shards")
    build_shards(BuildConfig(output=shards, json=(path,), image_folder=folder, maxcount=1000, progress=False))
    shard = ShardDirectory.open(shards).shards[0]
    encoder = SampleEncoder(load_tokenizer(tok_dir), TemplateConfig(bench_packing.TEMPLATE, system=""),
                            ImageConfig(size=384), args.seq_length)
    reader = ShardReader()
    for j in range(shard.count):  # warm the page cache and the tokenizer
        encoder.text_length(reader.read_record(shard, j))
    start = time.perf_counter()
    for j in range(shard.count):
        encoder.text_length(reader.read_record(shard, j))
    record_s = (time.perf_counter() - start) / shard.count
    start = time.perf_counter()
    for j in range(shard.count):
        encoder(reader.read(shard, j), "bench", shard.path, j)
    full_s = (time.perf_counter() - start) / shard.count
    sizes = [os.path.getsize(os.path.join(folder, r["image"])) for r in records if "image" in r]
    return {"record_s": record_s, "full_s": full_s, "jpeg_kb": statistics.mean(sizes) / 1024}


def print_length_cost(c: dict) -> None:
    print(f"\nlength cost per sample: json member + tokenize {c['record_s'] * 1e3:.3f} ms; the full read (json + "
          f"~{c['jpeg_kb']:.0f} KB JPEG decoded and resized to 384, tokenized) {c['full_s'] * 1e3:.2f} ms")
    print(f"{'DP':>4} {'global batch':>12} | {'lengths of the batch':>20} | {'reading own share':>17} | "
          f"{'overhead':>8}")
    for dp, gbs in LAYOUTS:
        plan, own = gbs * c["record_s"], gbs // dp * c["full_s"]
        print(f"{dp:>4} {gbs:>12} | {plan * 1e3:>17.1f} ms | {own * 1e3:>14.1f} ms | {plan / own:>7.0%}")


# ------------------------------------------------------------------------------------------ (b) DP=2 run


def run_rank(rank: int, port: int, args, data: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import dataclasses

    from himix_megatron import platform
    from himix_megatron.data import ShardLoader, load_tokenizer
    from himix_megatron.data.balance import BalanceConfig
    from himix_megatron.training import data as training_data

    platform.initialize(ParallelConfig(), seed=args.seed)
    bargs = bench_packing.parse_args(["--hidden", str(args.hidden), "--layers", str(args.layers), "--seq-length",
                                      str(args.seq_length), "--global-batch", str(args.global_batch),
                                      "--micro-batch", "1", "--seed", str(args.seed), "--vision-tokens",
                                      str(args.vision_tokens), "--vision-width", str(args.vision_width)])
    lm, vision = bench_packing.models(bargs)
    count = args.warmup + args.steps
    tokenizer = load_tokenizer(data["tokenizer"])
    encode = bench_packing.fake_encoder(vision.num_features, vision.hidden_size, args.global_batch, args.seed + 1)
    run = bench_packing.build_run(bargs, args.arch, lm, vision, data, tokenizer, encode, 2 * count)
    cfg = bench_packing.train_config(bargs, data, "pack", 2 * count)
    run = dataclasses.replace(run, cfg=cfg)
    cost = SampleCost(lm, args.arch, vision.num_features, vision.hidden_size, "finetune")  # no encoder: fake
    image_only = dataclasses.replace(vision, image_size=16)  # the features are stand-ins; keep decoding cheap
    streams, plans = {}, {}
    for strategy in ("balanced", "round-robin"):
        loader_cfg = training_data.loader_config(
            cfg, bench_packing.TEMPLATE, image_only, num_samples=count * args.global_batch,
            packing=training_data.packing_config(cfg, vision.num_features), group=args.global_batch // 2,
            arch=args.arch)
        loader = ShardLoader(dataclasses.replace(loader_cfg, balance=BalanceConfig(args.global_batch, cost, strategy)),
                             tokenizer, rank=rank, world_size=2)
        stream = training_data.step_stream(run, loader)
        streams[strategy], plans[strategy] = [], []
        for _ in range(count):
            streams[strategy].append(next(stream))
            plans[strategy].append(loader.last_plan)
    times = {s: [] for s in streams}
    from bench_packing import timed_step

    for k in range(count):
        order = ("balanced", "round-robin") if k % 2 == 0 else ("round-robin", "balanced")
        for strategy in order:
            torch.distributed.barrier()
            took = timed_step(run, streams[strategy][k])["wall"]
            if k >= args.warmup:
                times[strategy].append(took)
    torch.save({"times": times, "plans": {s: p[args.warmup:] for s, p in plans.items()}},
               os.path.join(out, f"rank{rank}.pt"))
    platform.shutdown()


def real_run(args, root: str) -> dict:
    import torch.multiprocessing as mp

    from himix_megatron.platform import free_port

    bargs = bench_packing.parse_args(["--samples", str((args.warmup + args.steps) * args.global_batch),
                                      "--seq-length", str(args.seq_length), "--seed", str(args.seed)])
    data = bench_packing.build_data(bargs, root)
    mp.start_processes(run_rank, args=(free_port(), args, data, root), nprocs=2, join=True, start_method="spawn")
    result = torch.load(os.path.join(root, "rank0.pt"), weights_only=False)
    result["lengths"] = data["lengths"]
    return result


def print_run(res: dict, args) -> None:
    t, p = res["times"], res["plans"]
    heaviest = {s: sum(max(x["loads"]) for x in p[s]) for s in p}
    print(f"\n(b) DP=2 real run ({args.arch}, hidden {args.hidden}, {args.layers} layers, N = {args.vision_tokens} x "
          f"d_v = {args.vision_width} per image, global batch "
          f"{args.global_batch}, {args.steps} timed steps per mode, gloo, 1 thread per rank)")
    print(f"{'':>12} | {'planned imbalance':>17} | {'step median':>11} | {'steps total':>11}")
    for s in ("round-robin", "balanced"):
        print(f"{s:>12} | {statistics.mean(x['imbalance'] for x in p[s]):>17.3f} | "
              f"{statistics.median(t[s]):>9.3f} s | {sum(t[s]):>9.2f} s")
    print(f"round-robin / balanced step time: {sum(t['round-robin']) / sum(t['balanced']):.3f} measured, "
          f"{heaviest['round-robin'] / heaviest['balanced']:.3f} predicted by the planner (heaviest rank's FLOPs)")
    # Step k is the same global batch in both modes: its ratio compares two splits of the same samples.
    paired = [a / b for a, b in zip(t["round-robin"], t["balanced"])]
    predicted = [max(a["loads"]) / max(b["loads"]) for a, b in zip(p["round-robin"], p["balanced"])]
    print(f"the same per step (same samples, two splits), median over steps: {statistics.median(paired):.3f} "
          f"measured, {statistics.median(predicted):.3f} predicted")
    samples = [len(x) for x in p["balanced"][0]["shares"]]
    print(f"per-step samples per rank, balanced, first step: {samples}")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    lengths, images = draw(20000, args.seq_length, np.random.default_rng(args.seed))
    a = np.asarray(lengths)
    print(f"length mix (tools/bench_packing.py's): {np.mean(np.asarray(images) == 0):.1%} text-only, "
          f"mean {a.mean():.0f}, median {np.median(a):.0f}, p90 {np.percentile(a, 90):.0f}, "
          f"p99 {np.percentile(a, 99):.0f} text tokens")
    print_planner(planner_table(args), args)
    with tempfile.TemporaryDirectory() as root:
        print_length_cost(length_cost(args, root))
        if not args.skip_run:
            print_run(real_run(args, root), args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
