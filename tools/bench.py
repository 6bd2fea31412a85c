#!/usr/bin/env python
"""HiMix against the vanilla LLaVA baseline: training steps on the same machine, in one run (issue 7).

    python tools/bench.py                        # hidden 1024, 8 layers, V:L = 728:64 and 728:200
    python tools/bench.py --threads 2 --repeats 5 --ratios 728:64

What is timed: one finetune-stage training step, the production path: megatron-core DistributedDataParallel
(fp32 gradient buffers) + `get_megatron_optimizer` (Adam, lr 2e-5, weight decay 0, grad clip 1.0): zero
grads, forward with loss, backward, grad-norm clip, optimizer step. Every decoder parameter trains in both
models, plus HiMix's vision K/V and RMSNorm_v, and the vanilla connector. The vision encoder is not run: both
read the same precomputed SigLIP-sized features [N, b, d_v], as training with a frozen encoder does. Both use
the same core attention (SDPA with a bottom-right causal mask on CPU, TEDotProductAttention on GPU).

A step is `--micro-batches` forward/backward passes of `--batch` samples and one optimizer step. The default, 4
passes of one sample, is still far fewer samples per optimizer step than training takes (the recipes step once
per 128-256 samples): the optimizer's per-parameter work, which the FLOPs accounting counts as zero and which is
the same for both models, weighs on HiMix's much shorter step. `--micro-batches 1` shows that worst case.

Order: `--warmup` steps of each, then `--repeats` rounds of one step each, alternating which model goes first
(ABBA), so drift in machine load hits both; medians are reported.

Figures per ratio:
- speedup = median vanilla step time / median HiMix step time (wall clock), with the forward, backward and
  optimizer phases; on CPU also the speedup in process CPU time, a cross-check that other processes on a
  shared machine inflate less (with --threads 1 it is exact work; with more threads it includes OpenMP
  spin-waits);
- FLOP ratio = training FLOPs vanilla / HiMix, `himix_megatron.flops.training_flops(stage="finetune")`
  (3 x forward, the model FLOPs of the step as MFU counts them) plus the vanilla connector (3 x its forward:
  it is timed too); the decoder-only ratio and the forward ratio (`decoder_cost`, the paper's Table 5 rule)
  are printed beside it. What the kernels execute differs from that count on both sides, and a note line
  says by how much: HiMix's local spec skips its vision K/V input-gradient GEMM (X_v is frozen, see
  himix_megatron/model/vision_kv.py), and vanilla's square causal SDPA skips about half of QK^T and AV;
- realization = speedup / FLOP ratio (1.0: HiMix saves wall clock exactly in proportion to its FLOPs), for
  the whole step and for forward + backward alone (the optimizer step costs the same in both models: it is
  per parameter, not per token, and amortises over gradient accumulation in real training);
- memory: on CPU the peak RSS of a fresh process running two steps of that model alone (the second step runs
  with Adam state allocated: the steady-state peak), and the bytes autograd saves for backward in one step
  (exact, counted with saved_tensors_hooks); on GPU torch.cuda.max_memory_allocated.
- on GPU: tokens/s (b * (N + M) per step: the same samples for both) and MFU = training FLOPs / time /
  assumed peak. Assumed peak: H100 SXM dense, 989e12 FLOP/s in BF16, 1979e12 in FP8 (--peak-tflops
  overrides). FP8 runs megatron's own TE path (config.fp8 = "hybrid", delayed scaling).

Two CPU settings, both applied to both models, each the CPU counterpart of what the GPU path already does:
- glibc keeps freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1; `--malloc default` turns it off).
  By default glibc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mappings
  and unmaps them on free, and trims the heap top, so every large temporary (weight gradients, optimizer
  temporaries, logits) is page-faulted afresh each step: ~1.4 GiB of page faults per HiMix step at the default
  size, ~0.8 s of a ~3 s step on this VM. CUDA's caching allocator does not return memory either.
- the optimizer runs torch's fused AdamW kernel. Without TE/apex, megatron-core falls back to
  torch.optim.AdamW, which on CPU defaults to its per-tensor loop with full-size temporaries (~0.5 s per step
  here against ~0.1 s fused). On GPU megatron uses TE/apex FusedAdam; this is its CPU analogue.

The last line is `realized: X`, the smallest whole-step realization over ratios (and precisions).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

# Import-time notices of megatron-core about the missing TE/apex (expected here) and deprecations.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*|full scope is deprecated.*")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from himix_megatron.config import LanguageModelConfig, ParallelConfig, VisionModelConfig  # noqa: E402

PEAK_FLOPS = {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12}  # H100 SXM, dense (fp32: without tensor cores)
ARCHS = ("himix", "vanilla")
PHASES = ("fwd", "bwd", "opt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-groups", type=int, default=8)
    p.add_argument("--ffn", type=int, default=None, help="default: 2.75 x hidden (2816 at 1024), multiple of 64")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--vision-width", type=int, default=1152, help="d_v (SigLIP so400m: 1152)")
    p.add_argument("--ratios", default="728:64,728:200", help="comma-separated N:M (vision:text tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=4,
                   help="forward/backward passes per optimizer step (gradient accumulation)")
    p.add_argument("--grad-accum-fusion", action="store_true",
                   help="accumulate weight gradients inside the wgrad GEMM (see build())")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared machine, OpenMP teams wait for "
                        "descheduled threads at every op; use all cores on a quiet one)")
    p.add_argument("--precision", default=None,
                   help="comma-separated from fp32,bf16,fp8 (default: fp32 on CPU; bf16 and, with TE, fp8 on GPU)")
    p.add_argument("--memory", choices=("rss", "none"), default="rss",
                   help="CPU: measure peak RSS in a fresh subprocess per model and ratio")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="CPU: 'keep' stops glibc returning freed memory to the kernel (see the docstring)")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: H100 SXM dense)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)  # internal: arch:N:M:precision
    args = p.parse_args(argv)
    if args.ffn is None:
        args.ffn = max(64, round(args.hidden * 2.75 / 64) * 64)
    try:
        args.ratio_list = [tuple(int(x) for x in r.split(":")) for r in args.ratios.split(",")]
        assert all(len(r) == 2 and r[0] >= 0 and r[1] > 0 for r in args.ratio_list)
    except (ValueError, AssertionError):
        p.error(f"--ratios must look like 728:64,728:200, got {args.ratios!r}")
    cuda = torch.cuda.is_available()
    if args.precision is None:
        from himix_megatron.model.core_attention import te_available

        args.precision = "bf16,fp8" if cuda and te_available() else ("bf16" if cuda else "fp32")
    args.precisions = args.precision.split(",")
    if any(x not in ("fp32", "bf16", "fp8") for x in args.precisions):
        p.error(f"--precision: unknown {args.precision!r}")
    if "fp8" in args.precisions and not cuda:
        p.error("--precision fp8 needs a GPU with transformer-engine")
    for name in ("threads", "batch", "micro_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap and never trim it (see the module docstring)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def use_fused_adam(optimizer) -> bool:
    """Switch megatron's torch.optim.Adam(W) fallback to torch's fused kernel (TE/apex FusedAdam's analogue)."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or inner.state:
        return False
    for group in inner.param_groups:  # Adam reads foreach/fused from the group at every step
        group["fused"], group["foreach"] = True, False
    return True


def models(args):
    lm = LanguageModelConfig("bench", args.hidden, args.layers, args.heads, args.kv_groups, args.ffn, args.vocab,
                             4096, 10000.0, 1e-5, False, False)
    vision = VisionModelConfig("bench-vision", args.vision_width, 1, 1, 1, 14, 14, 1e-6)
    return lm, vision


def build(arch, lm, vision, precision, grad_accum_fusion=False, seed=0, **overrides):
    """Model + megatron DDP + megatron optimizer, as a trainer builds them; `overrides`: TransformerConfig
    fields (tools/bench_baselines.py's gamma-MoD)."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from himix_megatron.config import build_transformer_config
    from himix_megatron.model.himix_model import HiMixModel
    from himix_megatron.model.vanilla import VanillaLLaVAModel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    extra = dict(fp8="hybrid", fp8_recipe="delayed") if precision == "fp8" else {}
    # Weight gradients accumulated straight into DDP's main_grad inside the wgrad GEMM (apex's kernel on GPU,
    # cpu_compat's addmm_ on CPU). Off by default: on this CPU it sped HiMix up ~8% but slowed vanilla's
    # larger GEMMs, so turning it on would flatter the ratio.
    extra["gradient_accumulation_fusion"] = grad_accum_fusion
    extra.update(overrides)
    config = build_transformer_config(lm, vision, arch=arch, params_dtype=dtype,
                                      use_cpu_initialization=not torch.cuda.is_available(), **extra)
    model = (HiMixModel if arch == "himix" else VanillaLLaVAModel)(config, lm)
    if torch.cuda.is_available():
        model.cuda()
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=2e-5, weight_decay=0.0, clip_grad=1.0, bf16=dtype == torch.bfloat16,
                        params_dtype=dtype),
        [ddp],
    )
    use_fused_adam(optimizer)
    return ddp, optimizer


def batch(lm, vision, n, m, b, precision, seed=1, arch="himix"):
    """Random text, X_v [n, b, d_v] and labels; vanilla's text holds the image id (after its first token, as the
    pretrain template puts it; where it sits changes no cost: the sequence is N + M long either way)."""
    from himix_megatron.data.templates import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, lm.vocab_size, (b, m + 1), generator=g)
    if arch == "vanilla":
        tokens[:, 1] = IMAGE_TOKEN_INDEX
    features = torch.randn(n, b, vision.hidden_size, generator=g)
    features = features.to(dev, torch.float32 if precision == "fp32" else torch.bfloat16)
    positions = torch.arange(m).expand(b, m)
    return tokens[:, :-1].to(dev), positions.to(dev), features, tokens[:, 1:].clamp(min=0).to(dev)


def step(ddp, optimizer, data, micro_batches=1):
    """One training step (micro_batches forward/backward passes, one optimizer step): wall seconds of its
    phases and in total, and process CPU seconds."""
    tokens, positions, features, labels = data
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    cpu, start = time.process_time(), time.perf_counter()
    optimizer.zero_grad()
    ddp.zero_grad_buffer()
    fwd = bwd = 0.0
    for _ in range(micro_batches):
        t0 = time.perf_counter()
        loss = ddp(tokens, positions, features, labels=labels).mean() / micro_batches
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
    ddp.finish_grad_sync()
    t2 = time.perf_counter()
    ok, _, _ = optimizer.step()
    sync()
    end = time.perf_counter()
    assert ok, "optimizer step skipped"
    return {"total": end - start, "fwd": fwd, "bwd": bwd, "opt": end - t2, "cpu": time.process_time() - cpu}


def saved_activation_bytes(ddp, data):
    """Bytes autograd keeps for backward over one forward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in ddp.module.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    tokens, positions, features, labels = data
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ddp(tokens, positions, features, labels=labels).mean()
    del loss
    return sum(seen.values())


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def probe(args):
    """Subprocess body: build one model, run two training steps, print its peak RSS as JSON."""
    from himix_megatron import platform

    arch, n, m, precision = args._probe.split(":")
    platform.initialize(ParallelConfig())
    lm, vision = models(args)
    ddp, optimizer = build(arch, lm, vision, precision, args.grad_accum_fusion)
    data = batch(lm, vision, int(n), int(m), args.batch, precision, arch=arch)
    built = _status_mb("VmRSS")
    for _ in range(2):
        step(ddp, optimizer, data, args.micro_batches)
    print(json.dumps({"peak_rss_mb": _status_mb("VmHWM"), "built_rss_mb": built}))


def measure_rss(args, arch, n, m, precision):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, os.path.abspath(__file__), "--_probe", f"{arch}:{n}:{m}:{precision}",
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
           "--kv-groups", str(args.kv_groups), "--ffn", str(args.ffn), "--vocab", str(args.vocab),
           "--vision-width", str(args.vision_width), "--batch", str(args.batch), "--precision", precision,
           "--micro-batches", "1",  # peak memory is one micro-batch's activations either way
           "--threads", str(args.threads), "--malloc", args.malloc]
    if args.grad_accum_fusion:
        cmd.append("--grad-accum-fusion")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def executed_work_note(lm, n, m, d_v, samples):
    """Training FLOPs the count includes but the kernels skip, per model (see the module docstring).

    HiMix: the vision K/V input gradient, one forward's worth of those GEMMs per layer, skipped by the
    local spec's fused backward only (TE's fused norm-linear computes it). Vanilla: SDPA with a square
    causal mask (flash on CPU and GPU) skips the blocks above the diagonal, about half of QK^T and AV
    in the forward and in the two-forwards'-worth backward; the exact share depends on the kernel's tiling.
    """
    from himix_megatron.model.core_attention import te_available

    vision_dgrad = 0 if te_available() else 2 * n * d_v * 2 * lm.kv_dim * lm.num_layers
    q = lm.num_attention_heads * lm.kv_channels
    causal_core = 3 * 2 * (2 * (n + m) * (n + m) * q) * lm.num_layers  # (QK^T + AV) x (1 fwd + 2 bwd)
    return {"himix": samples * vision_dgrad, "vanilla": samples * causal_core // 2}


def run_ratio(args, built, lm, vision, precision, n, m):
    """Interleaved timing of both models on one V:L ratio; returns the medians and every sample."""
    data = {arch: batch(lm, vision, n, m, args.batch, precision, arch=arch) for arch in ARCHS}
    samples = {arch: [] for arch in ARCHS}
    peak_gpu = {arch: 0.0 for arch in ARCHS}
    for _ in range(args.warmup):
        for arch in ARCHS:
            step(*built[arch], data[arch], args.micro_batches)
    for r in range(args.repeats):
        for arch in ARCHS if r % 2 == 0 else ARCHS[::-1]:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            samples[arch].append(step(*built[arch], data[arch], args.micro_batches))
            if torch.cuda.is_available():
                peak_gpu[arch] = max(peak_gpu[arch], torch.cuda.max_memory_allocated() / 2**20)
    median = {arch: {k: statistics.median(s[k] for s in samples[arch]) for k in samples[arch][0]}
              for arch in ARCHS}
    saved = {arch: saved_activation_bytes(built[arch][0], data[arch]) / 2**20 for arch in ARCHS}
    return median, samples, peak_gpu, saved


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    kept = (not cuda) and args.malloc == "keep" and keep_freed_memory()
    torch.set_num_threads(args.threads)
    if args._probe:
        probe(args)
        return 0

    from himix_megatron import platform
    from himix_megatron.flops import decoder_cost, training_flops

    platform.initialize(ParallelConfig())
    lm, vision = models(args)
    d_v, b = vision.hidden_size, args.batch * args.micro_batches  # samples per optimizer step
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores), {threads} threads"
    print(f"device: {device}; torch {torch.__version__}; glibc keeps freed memory: {kept}; "
          f"gradient accumulation fusion: {args.grad_accum_fusion}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"model: hidden {lm.hidden_size}, layers {lm.num_layers}, heads {lm.num_attention_heads}, "
          f"kv groups {lm.num_query_groups}, ffn {lm.ffn_hidden_size}, vocab {lm.vocab_size}, d_v {d_v}, "
          f"batch {args.batch} x {args.micro_batches} micro-batch(es) per optimizer step; finetune step "
          f"(everything but the vision encoder trains); warmup {args.warmup}, repeats {args.repeats}, interleaved")
    results, realizations = [], []
    for precision in args.precisions:
        built = {arch: build(arch, lm, vision, precision, args.grad_accum_fusion) for arch in ARCHS}
        for n, m in args.ratio_list:
            median, samples, peak_gpu, saved = run_ratio(args, built, lm, vision, precision, n, m)
            train = {arch: b * training_flops(lm, arch, n, m, "finetune", d_v) for arch in ARCHS}
            connector = b * 3 * decoder_cost(lm, "vanilla", n, m, d_v).connector_flops
            fwd_flops = {arch: decoder_cost(lm, arch, n, m, d_v).flops for arch in ARCHS}
            timed = {"himix": train["himix"], "vanilla": train["vanilla"] + connector}
            flop_ratio = timed["vanilla"] / timed["himix"]
            speedup = median["vanilla"]["total"] / median["himix"]["total"]
            fb = {arch: median[arch]["fwd"] + median[arch]["bwd"] for arch in ARCHS}
            fb_speedup = fb["vanilla"] / fb["himix"]
            cpu_speedup = median["vanilla"]["cpu"] / median["himix"]["cpu"]
            realization = speedup / flop_ratio
            realizations.append(realization)
            row = dict(precision=precision, vision_tokens=n, text_tokens=m, median_s=median, samples=samples,
                       speedup=speedup, fwd_bwd_speedup=fb_speedup, cpu_time_speedup=cpu_speedup,
                       flop_ratio=flop_ratio, decoder_train_flop_ratio=train["vanilla"] / train["himix"],
                       forward_flop_ratio=fwd_flops["vanilla"] / fwd_flops["himix"], train_flops=timed,
                       realization=realization, fwd_bwd_realization=fb_speedup / flop_ratio,
                       saved_for_backward_mb=saved)
            print(f"\n[{precision}] V:L = {n}:{m}")
            for arch in ARCHS:
                totals = [s["total"] for s in samples[arch]]
                phases = ", ".join(f"{k} {median[arch][k]:.3f}" for k in PHASES)
                print(f"  {arch:8s} step median {median[arch]['total']:7.3f} s (min {min(totals):.3f}, "
                      f"max {max(totals):.3f}, n={len(totals)}; {phases}; cpu {median[arch]['cpu']:.3f}), "
                      f"{timed[arch] / 1e9:.1f} GFLOP, {timed[arch] / median[arch]['total'] / 1e9:.1f} GFLOP/s")
            print(f"  speedup (vanilla/himix time): {speedup:.2f}x  [forward+backward only {fb_speedup:.2f}x; "
                  f"process CPU time {cpu_speedup:.2f}x]")
            print(f"  FLOP ratio (vanilla/himix, finetune train step incl. connector): {flop_ratio:.2f}x  "
                  f"[decoder only {row['decoder_train_flop_ratio']:.2f}x; forward, paper Table 5 rule "
                  f"{row['forward_flop_ratio']:.2f}x = {fwd_flops['vanilla'] / 1e9:.1f} / "
                  f"{fwd_flops['himix'] / 1e9:.1f} GFLOPs]")
            print(f"  realization (speedup / FLOP ratio): {realization:.2f}  "
                  f"[forward+backward only {row['fwd_bwd_realization']:.2f}]")
            skipped = executed_work_note(lm, n, m, d_v, b)
            row["counted_not_executed_flops"] = skipped
            print(f"  note: counted but not executed: himix {skipped['himix'] / 1e9:.1f} GFLOP (vision K/V input "
                  f"gradient), vanilla ~{skipped['vanilla'] / 1e9:.1f} GFLOP (masked half of causal QK^T/AV)")
            if cuda:
                row["peak_mem_mb"] = peak_gpu
                peak = (args.peak_tflops * 1e12) if args.peak_tflops else PEAK_FLOPS[precision]
                for arch in ARCHS:
                    tps = b * (n + m) / median[arch]["total"]
                    mfu = timed[arch] / median[arch]["total"] / peak
                    row.setdefault("tokens_per_s", {})[arch], row.setdefault("mfu", {})[arch] = tps, mfu
                    print(f"  {arch:8s} {tps:10.0f} tokens/s, MFU {100 * mfu:5.1f}% "
                          f"(assumed peak {peak / 1e12:.0f} TFLOP/s)")
                print("  peak memory (torch.cuda.max_memory_allocated): "
                      + ", ".join(f"{a} {peak_gpu[a]:.0f} MiB" for a in ARCHS))
            elif args.memory == "rss":
                rss = {arch: measure_rss(args, arch, n, m, precision) for arch in ARCHS}
                row["rss"] = rss
                print("  peak memory, RSS of a fresh process over 2 steps: " + ", ".join(
                    f"{a} {rss[a]['peak_rss_mb']:.0f} MiB (model+grads+optimizer built: "
                    f"{rss[a]['built_rss_mb']:.0f})" for a in ARCHS))
            print("  saved for backward (activations): " + ", ".join(f"{a} {saved[a]:.1f} MiB" for a in ARCHS))
            results.append(row)
        del built
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")
    print(f"realized: {min(realizations):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
