#!/usr/bin/env python
"""Sequence packing against padding: the same model trained on the same samples, HiMix and vanilla, in one run.

    python tools/bench_packing.py                       # ~4-5 min on a shared 2-core VM
    python tools/bench_packing.py --steps 1 --warmup 0 --layers 2 --global-batch 8    # a quick look
    python tools/bench_packing.py --skip-training --global-batch 128 --samples 4096  # cap table, bigger steps
    python tools/bench_packing.py --attention           # also: per-segment SDPA vs one block-diagonal SDPA

Data. LLaVA-format JSON + an image folder are written and built into shards with `build_shards`, then read
back through the trainer's own path (`training.data.loader_config` -> `ShardLoader` -> `step_stream`), so
what is measured is what `--packing-seq-length` / dynamic padding / `--pad-to-seq-length` give a user. The
text lengths (text tokens of a sample, template included: what a row holds) follow a LLaVA-665k-like mix:
- 1/3 short captions, uniform in 20-60 tokens (TextCaps / RefCOCO / VG-style one-liners);
- 5% text-only conversations (LLaVA-1.5 mixes in ~40k ShareGPT dialogues), and the remaining ~62% image
  conversations, both log-normal (mu 5.78, sigma 0.71: median ~320 tokens, 1-12 rounds), cut to 64-2048;
- overall: median ~200, mean ~290, p99 ~1500, at most 2048 (--seq-length; ~0.3% sit at the cut).
That is the shape that makes padding expensive: most samples are far shorter than --seq-length, and a few
long ones set the width of any micro-batch they land in. The realised figures are printed. Words map 1:1 to
tokens (a word-level tokenizer written here), so every length is exact.

Model. A small decoder (default hidden 256, 4 layers, GQA 4 heads / 2 groups, SwiGLU 704, vocab 1024), fp32,
finetune stage, the trainer's DDP + optimizer + scheduler (`trainer.train_step`). The vision encoder is NOT
run: `encode` returns fixed random SigLIP-shaped features (N = 728 tokens x d_v = 1152 per image), as
training with a frozen encoder reads precomputed ones; the paper's FLOPs exclude the encoder too. Both
archs read the same features. Images on disk are tiny (their pixels are never used).

Modes, each on the same samples, step for step (the loader stream is identical):
  (a) pad   : every sample padded to --seq-length (`--pad-to-seq-length`), micro-batches of --micro-batch;
  (b) dyn   : each micro-batch padded to its longest sample, rounded to 8 (the trainer's default);
  (c) pack  : `--packing-seq-length` = --seq-length, each step's --global-batch samples packed into rows
              (micro-batch 1 row, `--packing-max-images` default).
Order: --warmup steps of every (arch, mode), then --steps timed steps; at each timed step every (arch, mode)
runs once, in an order rotated and reversed from step to step, so drift in machine load spreads over all.
Data loading is not timed in the step (the loader prefetches in workers in real training); its cost per
step is printed separately.

Figures per arch and mode:
- padding efficiency = real text tokens / text positions computed (rows x width, packed rows' padding to a
  multiple of 8 included); samples per row (1 unless packed);
- samples/s over the timed steps (sum of samples / sum of wall time);
- computed FLOPs: what each mode executes, counted with `himix_megatron.flops` rules (matmuls, 3 x forward
  in finetune, QK^T/AV counted in full within the attended block): padded positions count as computed, and
  so do the vision K/V (HiMix) or image tokens (vanilla) of text-only samples in unpacked batches, which the
  models compute and mask. A packed row counts its linear layers over all row positions and attention per
  segment (segment i's queries over its own N + M_i keys; vanilla: its N + M_i positions, square), the pad
  segment included, exactly as `packed_sdpa` runs it. Vanilla adds its trained connector per image.
  Useful FLOPs are the same per sample at its real length (`training_flops`), the same for every mode;
- speedups of (c) over (a) and over (b) (wall time on the same samples), and realization = speedup / ratio of
  computed FLOPs (1.0: the time saved is exactly the work saved); beside them the same in process CPU time,
  which other processes on a shared machine inflate less (exact work with --threads 1, the default).
What the kernels execute differs from the count, and not equally across modes: vanilla's square causal SDPA
(CPU flash kernel, is_causal) skips the blocks above the diagonal, while HiMix's bottom-right mask over
[v; t] is materialised and nothing is skipped; a padded batch with a text-only sample adds an explicit mask.
So a realization above 1 or a vanilla/himix time ratio below the FLOP ratio is not an error in the count.

Image cap table: for caps 2, 4, 8, 16 and none, `plan_rows` alone over every step of the whole generated data
(cheap, no training): padding efficiency, the same when a step's rows are padded to its longest row (what
`training/data.py:one_decoder_length` does under pipeline parallelism), rows per step, images per row (mean,
max) and the largest row's key count (text + N x images: what sizes attention and the saved vision K/V of a
row). Without pipeline parallelism rows are only rounded up to 8, so the cap costs rows (smaller GEMMs, more
micro-batches), not padding; with it, rows closed early by the cap are padded to the step's fullest row.

`--attention`: `core_attention.packed_sdpa` (one SDPA per segment) against one SDPA over the whole row with
a block-diagonal bottom-right mask, forward + backward, on the two fullest rows planned from these lengths
(tools/bench_packed_attention.py sweeps synthetic rows of equal segments).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

_START = time.perf_counter()  # the printed wall time includes the imports

import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*|full scope is deprecated.*")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from himix_megatron.config import LanguageModelConfig, ParallelConfig, VisionModelConfig  # noqa: E402
from himix_megatron.training.config import default_max_images  # noqa: E402
from bench import keep_freed_memory  # noqa: E402  (tools/bench.py, beside this file)

ARCHS = ("himix", "vanilla")
MODES = ("pad", "dyn", "pack")
MODE_NAMES = {"pad": "(a) pad to seq-length", "dyn": "(b) dynamic padding", "pack": "(c) packing"}
TEMPLATE = "tinyllama"
# Length mix (see the module docstring).
CAPTION_FRACTION, TEXT_ONLY_FRACTION = 1 / 3, 0.05
CAPTION_RANGE = (20, 60)
CONV_MU, CONV_SIGMA, CONV_MIN = 5.78, 0.71, 64
ROUND_OVERHEAD = 5  # tinyllama without system prompt: "USER" ":" q "ASSISTANT" ":" a "</s>"
WORDS = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=2048, help="samples written to the shards (stats, cap table)")
    p.add_argument("--seq-length", type=int, default=2048, help="(a)'s width, the longest sample, (c)'s row length")
    p.add_argument("--global-batch", type=int, default=16, help="samples per step (packing packs one step)")
    p.add_argument("--micro-batch", type=int, default=4, help="samples per micro-batch in (a) and (b)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per arch and mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per arch and mode first")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-groups", type=int, default=2)
    p.add_argument("--ffn", type=int, default=None, help="default: 2.75 x hidden, multiple of 64 (704 at 256)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--vision-tokens", type=int, default=728, help="N per image (SigLIP-384: 728)")
    p.add_argument("--vision-width", type=int, default=1152, help="d_v (SigLIP so400m: 1152)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--max-images", type=int, default=None, help="(c)'s --packing-max-images (default: the trainer's)")
    p.add_argument("--caps", default="2,4,8,16,none", help="image caps for the plan_rows table")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared machine, OpenMP teams wait for descheduled "
                        "threads at every op, which swamps the differences measured here; all cores on a quiet one)")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="'keep': glibc keeps freed memory (as tools/bench.py; CUDA's allocator does too)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the data goes (default: a temporary directory)")
    p.add_argument("--skip-training", action="store_true", help="data figures and the cap table only")
    p.add_argument("--attention", action="store_true", help="also time packed_sdpa against one masked SDPA")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.ffn is None:
        args.ffn = max(64, round(args.hidden * 2.75 / 64) * 64)
    args.arch_list = [a for a in args.archs.split(",") if a]
    if not args.arch_list or any(a not in ARCHS for a in args.arch_list):
        p.error(f"--archs: choose from {ARCHS}, got {args.archs!r}")
    try:
        args.cap_list = [None if c == "none" else int(c) for c in args.caps.split(",")]
    except ValueError:
        p.error(f"--caps: integers or 'none', got {args.caps!r}")
    for name in ("samples", "seq_length", "global_batch", "micro_batch", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.global_batch % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide --global-batch {args.global_batch}")
    if args.seq_length % 8:
        p.error("--seq-length must be a multiple of 8 (packed rows are padded to multiples of 8)")
    if args.seq_length < CAPTION_RANGE[1]:
        p.error(f"--seq-length must be >= {CAPTION_RANGE[1]}")
    if args.samples < (args.warmup + args.steps) * args.global_batch:
        args.samples = (args.warmup + args.steps) * args.global_batch
    return args


# ----------------------------------------------------------------------------------------------- data


def target_lengths(n: int, seq_length: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """(kind, text tokens) per sample: kind caption | conversation | text (text-only conversation)."""
    out = []
    for _ in range(n):
        u = rng.random()
        if u < TEXT_ONLY_FRACTION:
            kind = "text"
        elif u < TEXT_ONLY_FRACTION + CAPTION_FRACTION:
            out.append(("caption", int(rng.integers(CAPTION_RANGE[0], CAPTION_RANGE[1] + 1))))
            continue
        else:
            kind = "conversation"
        # A sample keeps seq_length tokens, its BOS and image placeholder counted: seq_length - 2 text tokens fit.
        out.append((kind, int(np.clip(round(rng.lognormal(CONV_MU, CONV_SIGMA)), CONV_MIN, seq_length - 2))))
    return out


def conversation(kind: str, length: int, rng: np.random.Generator) -> list[dict]:
    """LLaVA `conversations` whose tinyllama encoding (system "") has exactly `length` text tokens."""
    rounds = 1 if kind == "caption" else int(np.clip(round(length / 120), 1, 12))
    rest = length - rounds * (ROUND_OVERHEAD + 2)  # words beyond one question and one answer word per round
    cuts = np.sort(rng.integers(0, rest + 1, rounds - 1))
    split = np.diff(np.concatenate([[0], cuts, [rest]])) + 2  # question + answer words of each round
    turns = []
    for i, w in enumerate(int(x) for x in split):
        q = 4 + int(rng.integers(0, 12)) if kind == "caption" else int(w * rng.uniform(0.1, 0.4))
        q = max(1, min(w - 1, q))
        a = w - q
        text = lambda k: " ".join(f"w{j}" for j in rng.integers(0, WORDS, k))  # noqa: E731
        question = text(q)
        if i == 0 and kind != "text":
            question = "<image>\n" + question
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": text(a)}]
    return turns


def write_tokenizer(directory: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + ["USER", "ASSISTANT", ":"] + [f"w{j}" for j in range(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
    return directory


def png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def build_data(args, root: str) -> dict:
    """Tokenizer, LLaVA JSON + images, shards; returns paths and every sample's (text tokens, has image)."""
    from himix_megatron.data import load_tokenizer
    from himix_megatron.data.build import BuildConfig, build_shards
    from himix_megatron.data.records import parse_conversation
    from himix_megatron.data.templates import TemplateConfig, encode_conversation

    rng = np.random.default_rng(args.seed)
    tok_dir = write_tokenizer(os.path.join(root, "tokenizer"))
    tokenizer = load_tokenizer(tok_dir)
    folder = os.path.join(root, "images")
    os.makedirs(folder, exist_ok=True)
    records, lengths, images = [], [], []
    template = TemplateConfig(TEMPLATE, system="")
    for i, (kind, length) in enumerate(target_lengths(args.samples, args.seq_length, rng)):
        rec = {"id": f"s{i:06d}", "conversations": conversation(kind, length, rng)}
        if kind != "text":
            rec["image"] = f"{i}.png"
            with open(os.path.join(folder, rec["image"]), "wb") as f:
                f.write(png(rng))
        enc = encode_conversation(parse_conversation(rec["conversations"], has_image=kind != "text"), tokenizer,
                                  template)
        if len(enc.ids) - 1 != length:
            raise AssertionError(f"sample {i} ({kind}) encodes to {len(enc.ids) - 1} text tokens, not {length}")
        records.append(rec)
        lengths.append(length)
        images.append(kind != "text")
    path = os.path.join(root, "llava.json")
    with open(path, "w") as f:
        json.dump(records, f)
    shards = os.path.join(root, "shards")
    build_shards(BuildConfig(output=shards, json=(path,), image_folder=folder, maxcount=1000, progress=False))
    return {"tokenizer": tok_dir, "shards": shards, "lengths": lengths, "has_image": images}


def length_stats(lengths) -> dict:
    a = np.asarray(lengths)
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "max": int(a.max()),
            "min": int(a.min())}


def cap_table(lengths, has_image, args, vision_tokens: int) -> list[dict]:
    """plan_rows over every whole step of the data, per image cap."""
    from himix_megatron.data.packing import ROW_MULTIPLE, PackingConfig, plan_rows

    g = args.global_batch
    steps = len(lengths) // g
    out = []
    for cap in args.cap_list:
        cfg = PackingConfig(args.seq_length, None, cap, vision_tokens)
        rows = real = width = pp_width = 0
        per_row, keys = [], 0
        for s in range(steps):
            lo = s * g
            plan = plan_rows(lengths[lo:lo + g], has_image[lo:lo + g], cfg)
            rows += len(plan)
            widths = []
            for r in plan:
                text = sum(lengths[lo + i] for i in r)
                imgs = sum(bool(has_image[lo + i]) for i in r)
                real += text
                widths.append(-(-text // ROW_MULTIPLE) * ROW_MULTIPLE)
                per_row.append(imgs)
                keys = max(keys, text + vision_tokens * imgs)
            width += sum(widths)
            pp_width += len(widths) * max(widths)  # one_decoder_length: a step's rows padded to its longest
        out.append({"cap": cap, "steps": steps, "rows_per_step": rows / steps, "efficiency": real / width,
                    "pp_efficiency": real / pp_width, "images_per_row": statistics.mean(per_row),
                    "max_images_per_row": max(per_row), "max_row_keys": keys})
    return out


# ---------------------------------------------------------------------------------------------- model


def models(args):
    lm = LanguageModelConfig("bench", args.hidden, args.layers, args.heads, args.kv_groups, args.ffn, args.vocab,
                             max(4096, args.seq_length + args.vision_tokens), 10000.0, 1e-5, False, False)
    # SigLIP-shaped: only its feature count (image_size / patch)^2 - 1 and width matter; it is never built.
    side = int(round((args.vision_tokens + 1) ** 0.5))
    if side * side != args.vision_tokens + 1:
        raise SystemExit(f"--vision-tokens {args.vision_tokens}: must be a square minus one (728 = 27^2 - 1)")
    vision = VisionModelConfig("siglip-shaped", args.vision_width, 1, 1, 1, side * 14, 14, 1e-6)
    return lm, vision


def train_config(args, data: dict, mode: str, total_iters: int):
    from himix_megatron.training.config import TrainConfig, check_packing

    cfg = TrainConfig(
        data_path=[data["shards"]], tokenizer_model=data["tokenizer"], system_prompt="", template=TEMPLATE,
        seq_length=args.seq_length, global_batch_size=args.global_batch,
        micro_batch_size=1 if mode == "pack" else args.micro_batch,
        packing_seq_length=args.seq_length if mode == "pack" else None,
        packing_max_images=args.max_images if mode == "pack" else None,
        pad_to_seq_length=mode == "pad", train_iters=total_iters, lr=1e-5, lr_warmup_fraction=0.0,
        lr_decay_style="constant", num_workers=0, seed=args.seed, progress=False)
    check_packing(cfg, 1)
    return cfg


def build_run(args, arch, lm, vision, data, tokenizer, encode, total_iters):
    """A trainer `Run` as `trainer.setup` makes it (world of one), but for a model given here."""
    from megatron.core.distributed import finalize_model_grads

    from himix_megatron.checkpoint import ModelDescription
    from himix_megatron.config import build_transformer_config
    from himix_megatron.model import model_class
    from himix_megatron.parallel.pipeline import build_model_chunks
    from himix_megatron.training.optimizer import apply_stage, build_optimizer, wrap_ddp
    from himix_megatron.training.trainer import Run

    cfg = train_config(args, data, "dyn", total_iters)
    torch.manual_seed(args.seed)
    config = build_transformer_config(lm, vision, arch=arch, params_dtype=torch.float32,
                                      use_cpu_initialization=not torch.cuda.is_available(),
                                      calculate_per_token_loss=True)
    chunks = build_model_chunks(model_class(arch), config, lm)
    apply_stage(chunks, "finetune")
    chunks = wrap_ddp(chunks, cfg)
    chunks[0].config.finalize_model_grads_func = finalize_model_grads
    optimizer, scheduler = build_optimizer(chunks, cfg, total_iters)
    description = ModelDescription(arch, lm, vision, TEMPLATE)
    return Run(cfg, description, chunks, encode, optimizer, scheduler, tokenizer, data["tokenizer"], TEMPLATE,
               total_iters, args.global_batch, args.global_batch // args.micro_batch)


def fake_encoder(vision_tokens: int, width: int, columns: int, seed: int):
    """Fixed random features [N, columns, d_v]; `encode(images)` hands back one column per image."""
    from himix_megatron import platform

    features = torch.randn(vision_tokens, columns, width, generator=torch.Generator().manual_seed(seed))
    features = features.to(platform.device())

    def encode(images):
        k = images.shape[0]
        if k > columns:
            return features.repeat(1, -(-k // columns), 1)[:, :k].contiguous()
        return features[:, :k].contiguous()

    return encode


def mode_steps(args, run, data, mode, count):
    """`count` steps of micro-batches through the trainer's loader path, and the seconds it took."""
    from himix_megatron.data import ShardLoader
    from himix_megatron.training import data as training_data

    cfg = train_config(args, data, mode, run.train_iters)
    packing = training_data.packing_config(cfg, run.description.vision.num_features)
    image_only = dataclasses.replace(run.description.vision, image_size=16)  # cheap: the features are stand-ins
    loader = ShardLoader(training_data.loader_config(cfg, TEMPLATE, image_only, num_samples=count * args.global_batch,
                                                     packing=packing, group=args.global_batch,
                                                     arch=run.description.arch),
                         run.tokenizer, rank=0, world_size=1)
    mode_run = dataclasses.replace(run, cfg=cfg)
    start = time.perf_counter()
    stream = training_data.step_stream(mode_run, loader)
    steps = [next(stream) for _ in range(count)]
    return mode_run, steps, time.perf_counter() - start


def step_figures(lm, arch, microbatches, vision_tokens, d_v, mixed_as_segments=False) -> dict:
    """What one step holds and computes (see the module docstring for the counting).

    `mixed_as_segments`: the model attends to an unpacked batch with imageless samples as one segment per
    sample, those without vision keys (HiMixModel on the TE spec); otherwise they get masked vision keys."""
    from himix_megatron.flops import decoder_cost, training_flops

    def sample_flops(n, m):  # one sample (or segment) of n vision and m text tokens, training
        return training_flops(lm, arch, n, m, "finetune", d_v) + 3 * decoder_cost(lm, arch, n, m, d_v).connector_flops

    f = dict(samples=0, text_tokens=0, positions=0, rows=0, images=0, computed_flops=0, useful_flops=0)
    for mb in microbatches:
        lengths = [int(n) for n in mb.lengths]
        if mb.segments is not None:
            seg = mb.segments
            present = list(seg.has_image[:len(lengths)])
            f["computed_flops"] += sum(sample_flops(vision_tokens if v else 0, m)
                                       for m, v in zip(seg.text_lengths, seg.has_image))
        else:
            b, width = mb.tokens.shape
            present = [True] * b if mb.image_present is None else [bool(v) for v in mb.image_present]
            if mixed_as_segments and not all(present):
                f["computed_flops"] += sum(sample_flops(vision_tokens if v else 0, width) for v in present)
            else:  # every sample gets N vision keys (HiMix) / image tokens (vanilla), masked where it has none
                f["computed_flops"] += b * sample_flops(vision_tokens, width)
        f["samples"] += len(lengths)
        f["text_tokens"] += sum(lengths)
        f["positions"] += mb.tokens.numel()
        f["rows"] += mb.tokens.shape[0]
        f["images"] += sum(present)
        f["useful_flops"] += sum(sample_flops(vision_tokens if v else 0, m) for m, v in zip(lengths, present))
    return f


def timed_step(run, microbatches) -> dict:
    from himix_megatron.training.trainer import train_step

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    cpu, start = time.process_time(), time.perf_counter()
    _, _, skipped = train_step(run, microbatches)
    sync()
    wall = time.perf_counter() - start
    if skipped:
        raise RuntimeError("a benchmark step was skipped (NaN/Inf loss or grad norm)")
    return {"wall": wall, "cpu": time.process_time() - cpu}


def train_bench(args, data, lm, vision) -> dict:
    from himix_megatron import platform
    from himix_megatron.data import load_tokenizer

    platform.initialize(ParallelConfig(), seed=args.seed)
    n, d_v = vision.num_features, vision.hidden_size
    count = args.warmup + args.steps
    total_iters = count * len(MODES)
    tokenizer = load_tokenizer(data["tokenizer"])
    encode = fake_encoder(n, d_v, args.global_batch, args.seed + 1)
    runs, steps, load_s = {}, {}, {}
    for arch in args.arch_list:
        base = build_run(args, arch, lm, vision, data, tokenizer, encode, total_iters)
        for mode in MODES:
            runs[arch, mode], steps[arch, mode], load_s[arch, mode] = mode_steps(args, base, data, mode, count)
    first = args.arch_list[0]
    for mode in MODES:  # the loader stream is the same for every mode: check it (by each step's sample lengths)
        got = [sorted(int(x) for mb in s for x in mb.lengths) for s in steps[first, mode]]
        ref = [sorted(int(x) for mb in s for x in mb.lengths) for s in steps[first, "pad"]]
        if got != ref:
            raise AssertionError(f"mode {mode} reads other samples than mode pad")
    combos = [(arch, mode) for arch in args.arch_list for mode in MODES]
    t0 = time.perf_counter()
    for w in range(args.warmup):
        for combo in combos:
            timed_step(runs[combo], steps[combo][w])
    warm_s = time.perf_counter() - t0
    times = {c: [] for c in combos}
    for k in range(args.steps):
        order = combos[k % len(combos):] + combos[:k % len(combos)]
        for combo in (order if k % 2 == 0 else order[::-1]):
            times[combo].append(timed_step(runs[combo], steps[combo][args.warmup + k]))
    results = {}
    for arch, mode in combos:
        model = runs[arch, mode].chunks[0].module
        segmented = bool(getattr(model, "mixed_batches_as_segments", False))
        figures = [step_figures(lm, arch, s, n, d_v, segmented) for s in steps[arch, mode][args.warmup:]]
        tot = {k: sum(f[k] for f in figures) for k in figures[0]}
        wall = sum(t["wall"] for t in times[arch, mode])
        results[arch, mode] = dict(
            **tot, wall_s=wall, cpu_s=sum(t["cpu"] for t in times[arch, mode]),
            step_wall_s=[t["wall"] for t in times[arch, mode]],
            efficiency=tot["text_tokens"] / tot["positions"], samples_per_row=tot["samples"] / tot["rows"],
            samples_per_s=tot["samples"] / wall, gflops_per_s=tot["computed_flops"] / wall / 1e9,
            load_s_per_step=load_s[arch, mode] / count)
    trained = [int(x) for s in steps[first, "pad"][args.warmup:] for mb in s for x in mb.lengths]
    return {"results": results, "warmup_s": warm_s, "trained_lengths": trained}


# ------------------------------------------------------------------------------------------ attention


def block_mask(segments) -> torch.Tensor:
    """[T, K] bool, True = attend: each segment's queries over its own keys, causal aligned bottom-right."""
    cq, ck = segments.cu_seqlens_q.tolist(), segments.cu_seqlens_kv.tolist()
    mask = torch.zeros(cq[-1], ck[-1], dtype=torch.bool)
    for q0, q1, k0, k1 in zip(cq, cq[1:], ck, ck[1:]):
        m, k = q1 - q0, k1 - k0
        mask[q0:q0 + m, k0:k0 + k] = torch.ones(m, k, dtype=torch.bool).tril(k - m)
    return mask


def attention_bench(args, lm, lengths, has_image, vision_tokens, repeats=3) -> list[dict]:
    """packed_sdpa against one SDPA with a block-diagonal mask, forward + backward, on planned rows."""
    import torch.nn.functional as F

    from himix_megatron.data.packing import ROW_MULTIPLE, PackingConfig, plan_rows, segment_params
    from himix_megatron.model.core_attention import packed_sdpa

    cfg = PackingConfig(args.seq_length, None, args.max_images or default_max_images(args.seq_length),
                        vision_tokens)
    g = args.global_batch
    plan = plan_rows(lengths[:g], has_image[:g], cfg)
    heads, groups, hn = lm.num_attention_heads, lm.num_query_groups, lm.kv_channels
    gen = torch.Generator().manual_seed(0)
    out = []
    for arch in args.arch_list:
        for r in sorted(plan, key=len, reverse=True)[:2]:  # the two fullest rows of the first step
            text = [lengths[i] for i in r]
            imgs = [bool(has_image[i]) for i in r]
            pad = -(-sum(text) // ROW_MULTIPLE) * ROW_MULTIPLE - sum(text)
            seg = segment_params(text + ([pad] if pad else []), imgs + ([False] if pad else []), vision_tokens)
            if arch == "vanilla":  # the square view: the sequence is the key sequence
                seg = seg.square()
            t, k = int(seg.cu_seqlens_q[-1]), int(seg.cu_seqlens_kv[-1])
            q = torch.randn(t, heads, hn, generator=gen, requires_grad=True)
            kk = torch.randn(k, groups, hn, generator=gen, requires_grad=True)
            v = torch.randn(k, groups, hn, generator=gen, requires_grad=True)
            mask = block_mask(seg)

            def packed():
                return packed_sdpa(q, kk, v, seg)

            def masked():
                o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                                   v.transpose(0, 1)[None], attn_mask=mask,
                                                   enable_gqa=groups != heads)
                return o[0].transpose(0, 1).reshape(t, heads * hn)

            err = (packed() - masked()).abs().max().item()  # also the warm-up of both
            secs = {}
            for name, fn in (("packed", packed), ("masked", masked)):
                best = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    fn().square().sum().backward()
                    best.append(time.perf_counter() - start)
                    q.grad = kk.grad = v.grad = None
                secs[name] = statistics.median(best)
            out.append(dict(arch=arch, segments=len(text), images=sum(imgs), queries=t, keys=k,
                            packed_s=secs["packed"], masked_s=secs["masked"], max_abs_diff=err))
    return out


# ----------------------------------------------------------------------------------------------- main


def image_in_text_tokens(lm: LanguageModelConfig, n: int, d_v: int) -> float:
    """One image's HiMix vision K/V projection, in text tokens' worth of a layer's linear layers."""
    q = lm.num_attention_heads * lm.kv_channels
    d = lm.hidden_size
    per_token = 2 * (d * (q + 2 * lm.kv_dim) + q * d + 3 * d * lm.ffn_hidden_size)
    return 2 * n * d_v * 2 * lm.kv_dim / per_token


def print_data(stats: dict, lengths, has_image, seconds: float) -> None:
    captions = sum(1 for m, v in zip(lengths, has_image) if v and m <= CAPTION_RANGE[1])
    print(f"\ndata: {stats['n']} samples written as LLaVA JSON + images and built into shards in {seconds:.1f} s; "
          f"text tokens per sample (template included): mean {stats['mean']:.0f}, median {stats['median']:.0f}, "
          f"p90 {stats['p90']:.0f}, p99 {stats['p99']:.0f}, min {stats['min']}, max {stats['max']}; "
          f"{sum(not v for v in has_image) / len(lengths):.1%} text-only, "
          f"{captions / len(lengths):.1%} with an image and <= {CAPTION_RANGE[1]} tokens")


def print_caps(caps: list, args, n: int) -> None:
    print(f"\nimage cap per packed row (plan_rows only, {caps[0]['steps']} steps of {args.global_batch} samples, "
          f"rows of {args.seq_length}; trainer default --packing-max-images = "
          f"{default_max_images(args.seq_length)}):")
    print(f"  {'cap':>5s} {'pad eff':>8s} {'PP pad eff':>10s} {'rows/step':>10s} {'img/row':>8s} "
          f"{'max img/row':>12s} {'max row keys':>13s}")
    for c in caps:
        print(f"  {str(c['cap'] or 'none'):>5s} {c['efficiency']:8.3f} {c['pp_efficiency']:10.3f} "
              f"{c['rows_per_step']:10.2f} {c['images_per_row']:8.2f} {c['max_images_per_row']:12d} "
              f"{c['max_row_keys']:13d}")
    print(f"  (unpacked: {args.global_batch} rows/step of one sample. PP pad eff: HiMix under pipeline "
          f"parallelism, where a step's rows are padded to its longest. Max row keys = text + {n} x images: the "
          f"attention length and the vision K/V a row holds per layer)")


def print_attention(att: list) -> None:
    print("\nattention, forward + backward of one row (median of 3): packed_sdpa (one SDPA per segment) "
          "vs one SDPA with a block-diagonal mask")
    for a in att:
        print(f"  {a['arch']:8s} {a['segments']:2d} segments, {a['images']:2d} images, {a['queries']:5d} queries "
              f"x {a['keys']:5d} keys: packed {a['packed_s']:.3f} s, masked {a['masked_s']:.3f} s "
              f"({a['masked_s'] / a['packed_s']:.2f}x), max |diff| {a['max_abs_diff']:.1e}")


def print_training(args, lm, res: dict) -> None:
    for arch in args.arch_list:
        print(f"\n[{arch}] {args.steps} steps x {args.global_batch} samples "
              f"({res[arch, 'pad']['text_tokens']} real text tokens, {res[arch, 'pad']['images']} images)")
        print(f"  {'mode':24s} {'pad eff':>7s} {'smp/row':>7s} {'rows':>5s} {'samples/s':>9s} {'step s':>7s} "
              f"{'computed GFLOP':>14s} {'useful/comp':>11s} {'GFLOP/s':>7s} {'load s/step':>11s}")
        for mode in MODES:
            r = res[arch, mode]
            print(f"  {MODE_NAMES[mode]:24s} {r['efficiency']:7.3f} {r['samples_per_row']:7.2f} {r['rows']:5d} "
                  f"{r['samples_per_s']:9.2f} {r['wall_s'] / args.steps:7.2f} {r['computed_flops'] / 1e9:14.1f} "
                  f"{r['useful_flops'] / r['computed_flops']:11.3f} {r['gflops_per_s']:7.1f} "
                  f"{r['load_s_per_step']:11.3f}")
        packed = res[arch, "pack"]
        for ref in ("pad", "dyn"):
            a = res[arch, ref]
            speedup, cpu_speedup = a["wall_s"] / packed["wall_s"], a["cpu_s"] / packed["cpu_s"]
            ratio = a["computed_flops"] / packed["computed_flops"]
            packed.update({f"speedup_over_{ref}": speedup, f"cpu_speedup_over_{ref}": cpu_speedup,
                           f"flop_ratio_over_{ref}": ratio, f"realization_over_{ref}": speedup / ratio,
                           f"cpu_realization_over_{ref}": cpu_speedup / ratio})
            print(f"  (c) over {MODE_NAMES[ref][:3]}: speedup {speedup:.2f}x, computed FLOP ratio {ratio:.2f}x, "
                  f"realization {speedup / ratio:.2f}  [process CPU time: speedup {cpu_speedup:.2f}x, "
                  f"realization {cpu_speedup / ratio:.2f}]")
    if "himix" in args.arch_list and "vanilla" in args.arch_list:
        print("\nvanilla / himix step time, same samples: " + ", ".join(
            f"{m} {res['vanilla', m]['wall_s'] / res['himix', m]['wall_s']:.2f}x" for m in MODES))
    summary = "; ".join(
        f"{a}: padding efficiency {res[a, 'pack']['efficiency']:.3f} (dynamic {res[a, 'dyn']['efficiency']:.3f}, "
        f"pad {res[a, 'pad']['efficiency']:.3f}), realization over (a) {res[a, 'pack']['realization_over_pad']:.2f} "
        f"(CPU time {res[a, 'pack']['cpu_realization_over_pad']:.2f}), over (b) "
        f"{res[a, 'pack']['realization_over_dyn']:.2f} (CPU time {res[a, 'pack']['cpu_realization_over_dyn']:.2f})"
        for a in args.arch_list)
    print(f"\npacking: {summary}")
    print("  expected (issue): padding efficiency >= 0.95 with packing; realization >= 0.8 for HiMix (c) over (a)")


def main(argv=None) -> int:
    args = parse_args(argv)
    kept = args.malloc == "keep" and keep_freed_memory()
    torch.set_num_threads(args.threads)
    lm, vision = models(args)
    n, d_v = vision.num_features, vision.hidden_size
    print(f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} threads; torch {torch.__version__}; glibc keeps "
          f"freed memory: {kept}; load average {os.getloadavg()[0]:.2f} at start")
    report: dict = {"args": {k: v for k, v in vars(args).items() if k not in ("arch_list", "cap_list")}}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        data = build_data(args, args.workdir or tmp)
        lengths, has_image = data["lengths"], data["has_image"]
        report["data"] = length_stats(lengths)
        print_data(report["data"], lengths, has_image, time.perf_counter() - t)
        report["caps"] = cap_table(lengths, has_image, args, n)
        print_caps(report["caps"], args, n)
        if args.attention:
            report["attention"] = attention_bench(args, lm, lengths, has_image, n)
            print_attention(report["attention"])
        if not args.skip_training:
            from himix_megatron.config import language_model_preset

            print(f"\nmodel: hidden {lm.hidden_size}, layers {lm.num_layers}, heads {lm.num_attention_heads}, kv "
                  f"groups {lm.num_query_groups}, ffn {lm.ffn_hidden_size}, vocab {lm.vocab_size}, fp32, finetune; "
                  f"vision features N={n} x d_v={d_v} (fixed random, no encoder run); global batch "
                  f"{args.global_batch}, (a)/(b) micro-batch {args.micro_batch}; warmup {args.warmup}, {args.steps} "
                  f"timed steps per arch and mode, interleaved")
            print(f"  one image's HiMix vision K/V projection = {image_in_text_tokens(lm, n, d_v):.0f} text tokens of "
                  f"a layer's linear work here (Vicuna-7B: "
                  f"{image_in_text_tokens(language_model_preset('vicuna-7b'), 728, 1152):.0f})")
            bench = train_bench(args, data, lm, vision)
            trained = report["trained_samples"] = length_stats(bench["trained_lengths"])
            print(f"  timed samples: {trained['n']}, text tokens mean {trained['mean']:.0f}, median "
                  f"{trained['median']:.0f}, p99 {trained['p99']:.0f}, max {trained['max']}; "
                  f"warm-up {bench['warmup_s']:.1f} s")
            print_training(args, lm, bench["results"])
            report["training"] = {f"{a}/{m}": v for (a, m), v in bench["results"].items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end; wall time {time.perf_counter() - _START:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
