"""GPU self-check: proves the Transformer Engine path on one GPU in a few minutes, with a PASS / FAIL table.

    python tools/gpu_selfcheck.py [--out DIR] [--only NAME ...] [--list]

Checks (each prints its figures next to the verdict; tolerances are stated in the table):

  train-resume   himix-train under torchrun on the GPU (tiny model, synthetic data, bf16, packed rows):
                 6 steps saving at 3, then a resume from 3 whose losses 4-6 match the uninterrupted run's.
  te-vs-local    HiMix and vanilla built with the TE spec and the local spec from the same weights, through a
                 checkpoint saved by one and loaded by the other (both directions), bf16: per-token losses and
                 every parameter gradient, on a mixed batch (one sample without an image; vanilla's image ids at
                 different places); and a packed THD row against its samples one at a time, for both.
  attention-*    TEMixtureDotProductAttention on the flash and on the fused backend, one at a time (forced
                 with NVTE_FLASH_ATTN / NVTE_FUSED_ATTN in a child process, NVTE_DEBUG naming the backend
                 that ran): causal_bottom_right (sbhd, more keys than queries) and packed THD with
                 padding_causal_bottom_right, against fp32 SDPA with explicit bottom-right masks; outputs and
                 input gradients.
  fp8            30 training steps under each --fp8-recipe (tensorwise, delayed, mxfp8, blockwise) against the
                 same 30 in bf16 (tiny decoder, the tiny-112 encoder: N = 63): the mean loss of the last five
                 must stay within 0.05 of bf16's; samples/s of each. A recipe this GPU or TE cannot serve is a
                 SKIP with the reason (training/fp8.py).
  text-only      on the TE spec, in bf16 and each FP8 recipe the GPU serves: a micro-batch in which no sample
                 has an image (it must equal the text-only forward: no empty X_v may reach TE), and a mixed
                 micro-batch of 8 with N = 63 and one text-only sample (441 vision GEMM rows, padded inside the
                 layer under FP8), its loss against bf16's.
  vicuna-width   one training step (forward + backward) of a Vicuna-7B-width decoder (4096 wide, 2 layers,
                 SigLIP-sized X_v 728 x 1152, 64 text tokens, micro-batch 8) in bf16 and each FP8 recipe the GPU
                 serves: tokens/s, model TFLOP/s, MFU against the GPU's peak, peak memory; and the vanilla / HiMix
                 step-time ratio at 728:64 beside the ratio of their training FLOPs (tools/bench.py's GPU
                 counterpart).

It is one process on one GPU whatever the environment: launched as rank k > 0 of srun / torchrun / mpirun it
exits at once; rank 0 (or a plain launch) drops every launcher and rendezvous variable (SLURM_*, RANK,
MASTER_PORT, ...) from its environment, starts torch.distributed as a world of one on a free port, and starts
its children (himix-train under torchrun --standalone, the attention checks) in that clean environment.
A backend or recipe the GPU cannot have is a SKIP, not a FAIL, and each case reports on its own. The last
lines name the attention backends and FP8 recipes that ran.

Without a GPU it says so and exits 0: nothing here can pass on a CPU. Exit status 1 if any check FAILs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


@dataclass
class Row:
    check: str
    status: str  # PASS / FAIL / SKIP
    figures: str


def render(rows: list[Row]) -> str:
    width = max([len(r.check) for r in rows] + [5])
    lines = [f"{'check':<{width}} | result | figures", f"{'-' * width}-+--------+--------"]
    lines += [f"{r.check:<{width}} | {r.status:<6} | {r.figures}" for r in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --- shared pieces ---------------------------------------------------------------------------------------------


def synthetic_data(out: str) -> tuple[str, str]:
    from himix_megatron.data.synthetic import SyntheticConfig, generate, write_word_tokenizer

    data = os.path.join(out, "data")
    if not os.path.isdir(os.path.join(data, "train")):
        generate(SyntheticConfig(num_samples=600, seed=0, maxcount=200), os.path.join(data, "train"))
        write_word_tokenizer(os.path.join(data, "tok"))
    return os.path.join(data, "train"), os.path.join(data, "tok")


LOSS_LINE = re.compile(r"^iteration\s+(\d+) \| loss ([\d.]+|nan|inf)")
SPEED = re.compile(r"\| ([\d.]+) samples/s \|")

# What launchers set for a process of a multi-process job: a child that inherits them would try to join that
# job's rendezvous (bind its MASTER_PORT, wait for SLURM_NTASKS ranks), so the self-check drops them all.
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "MPI_LOCALRANKID"}
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_", "PET_")
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def single_process_env(env) -> dict:
    """`env` without any launcher or rendezvous variable: a process started with it is a world of its own."""
    return {k: v for k, v in env.items() if k not in LAUNCH_VARIABLES and not k.startswith(LAUNCH_PREFIXES)}


def launcher_rank(env) -> int:
    """This process's rank under srun / torchrun / mpirun (0 for a plain launch)."""
    for name in RANK_VARIABLES:
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def himix_train(args: list[str], log: str) -> tuple[dict[int, float], dict[int, float]]:
    """Run himix-train under torchrun on one GPU, in a clean environment; ({iteration: loss},
    {iteration: samples/s}) from its log lines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "himix_megatron.train", "--log-interval", "1", "--no-progress", "--num-workers", "0", *args]
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, text=True,
                              env=single_process_env(os.environ))
    text = open(log, encoding="utf-8").read()
    if proc.returncode != 0:
        raise RuntimeError(f"himix-train exited {proc.returncode}; log {log}:\n" + "\n".join(text.splitlines()[-15:]))
    losses, speed = {}, {}
    for line in text.splitlines():
        m = LOSS_LINE.match(line)
        if m:
            losses[int(m.group(1))] = float(m.group(2))
            fast = SPEED.search(line)
            if fast:
                speed[int(m.group(1))] = float(fast.group(1))
    return losses, speed


def tiny_train_args(data: str, tok: str, *extra: str, vision: str = "tiny") -> list[str]:
    return ["--model", "tiny", "--vision-model", vision, "--data-path", data, "--tokenizer-model", tok,
            "--system-prompt", "", "--seq-length", "24", "--lr", "3e-3", "--seed", "1234", "--bf16", *extra]


def single_launch():
    """A world of one on a free local port, whatever the environment says (never launch discovery)."""
    from himix_megatron import platform

    return platform.Launch(0, 1, 0, "127.0.0.1", platform.free_port(), "single")


def init_single_rank():
    from megatron.core import parallel_state

    from himix_megatron import platform
    from himix_megatron.config import ParallelConfig

    if not parallel_state.model_parallel_is_initialized():
        platform.initialize(ParallelConfig(), launch=single_launch())


def rel(a, b) -> float:
    """|a - b| / |b| over whole tensors (norms), in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# --- train-resume -----------------------------------------------------------------------------------------------


def check_train_resume(out: str) -> list[Row]:
    data, tok = synthetic_data(out)
    run = os.path.join(out, "train-resume")
    base = tiny_train_args(data, tok, "--micro-batch-size", "1", "--packing-seq-length", "64",
                           "--global-batch-size", "16", "--train-iters", "6")
    full, _ = himix_train(base + ["--save", os.path.join(run, "full"), "--save-interval", "3"],
                          os.path.join(run, "full.log"))
    resumed, _ = himix_train(base + ["--save", os.path.join(run, "resumed"),
                                     "--load", os.path.join(run, "full", "iter_0000003")],
                             os.path.join(run, "resumed.log"))
    tolerance = 2e-2  # bf16, and flash attention's backward accumulates in a nondeterministic order
    worst = max(abs(resumed[i] - full[i]) for i in (4, 5, 6))
    ok = sorted(full) == list(range(1, 7)) and sorted(resumed) == [4, 5, 6] and worst <= tolerance \
        and full[6] < full[1]
    return [Row("train-resume", verdict(ok), f"losses {full[1]:.4f} -> {full[6]:.4f}; resumed 4-6 differ by at most "
                                             f"{worst:.2e} (<= {tolerance})")]


# --- te-vs-local ------------------------------------------------------------------------------------------------


# Local parameter names -> the TE spec's, which fuses each norm into the linear after it (the same renames the
# checkpoints' keys maps make).
TE_NAMES = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
            ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
            ("self_attention.vision_norm.", "self_attention.linear_kv_vision.layer_norm_"))


def _grads(chunk, te_spec: bool) -> dict:
    """Each parameter's gradient under its TE-spec name, so the two specs' gradients pair up."""
    grads = {}
    for name, param in chunk.named_parameters():
        if param.grad is None:
            continue
        if not te_spec:
            for local, fused in TE_NAMES:
                name = name.replace(local, fused)
        grads[name] = param.grad
    return grads


def _batch(vocab: int, batch: int, text: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, text + 1), generator=g)
    return ids[:, :-1].cuda(), torch.arange(text).expand(batch, text).cuda(), ids[:, 1:].cuda()


def _run(chunk, encoder, tokens, positions, labels, images, **kw):
    chunk.zero_grad()
    features = encoder(images)
    loss = chunk(tokens, positions, features, labels=labels, **kw)
    loss.float().sum().backward()
    return loss.detach().float(), features, _grads(chunk, chunk.use_te)


def check_te_vs_local(out: str) -> list[Row]:
    import torch

    from himix_megatron.checkpoint import ModelDescription, build_model, load_checkpoint, save_checkpoint
    from himix_megatron.config import ParallelConfig, language_model_preset, vision_model_preset
    from himix_megatron.data.packing import segment_params
    from himix_megatron.data.templates import IMAGE_TOKEN_INDEX

    init_single_rank()
    rows = []
    loss_tol, grad_tol = 2e-2, 5e-2  # bf16: TE's fused kernels and the local ones round differently
    for arch in ("himix", "vanilla"):
        description = ModelDescription(arch, language_model_preset("tiny"), vision_model_preset("tiny"))
        build = lambda use_te: build_model(description, ParallelConfig(), use_cpu_initialization=False,  # noqa: E731
                                           params_dtype=torch.bfloat16, use_te=use_te)
        local, local_encoder = build(False)
        saved = save_checkpoint(os.path.join(out, f"te-vs-local/{arch}-local"), local, description,
                                encoder=local_encoder)
        te, te_encoder = build(True)
        load_checkpoint(saved, te, encoder=te_encoder)
        tokens, positions, labels = _batch(description.language.vocab_size, 4, 16, seed=1)
        images = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(2)).cuda()
        present = torch.tensor([True, False, True, True]).cuda()
        if arch == "vanilla":  # its text holds the image id where the template puts it; none without an image
            tokens[[0, 2, 3], [3, 1, 6]] = IMAGE_TOKEN_INDEX
        ref_loss, ref_features, ref_grads = _run(local[0], local_encoder, tokens, positions, labels, images,
                                                 image_present=present)
        loss, features, grads = _run(te[0], te_encoder, tokens, positions, labels, images, image_present=present)
        worst = max((rel(grads[k], g) for k, g in ref_grads.items() if k in grads), default=float("inf"))
        missing = sorted(set(ref_grads) ^ set(grads))
        figures = (f"encoder features rel {rel(features, ref_features):.1e}; losses max |diff| "
                   f"{(loss - ref_loss).abs().max().item():.1e} (<= {loss_tol}); gradients max rel {worst:.1e} "
                   f"(<= {grad_tol})" + (" with an imageless sample" if present is not None else "")
                   + (f"; gradients of only one spec: {missing[:3]}" if missing else ""))
        ok = (loss - ref_loss).abs().max().item() <= loss_tol and worst <= grad_tol and not missing
        rows.append(Row(f"te-vs-local {arch} (local ckpt -> TE)", verdict(ok), figures))

        # The other direction: a TE checkpoint (with its _extra_state entries) into a fresh local model.
        saved_te = save_checkpoint(os.path.join(out, f"te-vs-local/{arch}-te"), te, description, encoder=te_encoder)
        back, back_encoder = build(False)
        load_checkpoint(saved_te, back, encoder=back_encoder)
        back_loss, _, _ = _run(back[0], back_encoder, tokens, positions, labels, images, image_present=present)
        diff = (back_loss - ref_loss).abs().max().item()
        rows.append(Row(f"te-vs-local {arch} (TE ckpt -> local)", verdict(diff <= 1e-5),
                        f"losses equal the original local model's: max |diff| {diff:.1e}"))

        # A packed THD row on TE against its samples one at a time.
        lengths, flags = [5, 9, 3, 7], [True, False, True, True]
        slots = [3, None, 1, 6] if arch == "vanilla" else ()
        seg = segment_params(lengths, flags, description.vision.num_features, image_slots=slots).to(tokens.device)
        row_tokens = torch.cat([tokens[i, :n] for i, n in enumerate(lengths)])[None]
        row_labels = torch.cat([labels[i, :n] for i, n in enumerate(lengths)])[None]
        with torch.no_grad():
            features = te_encoder(images)
            packed = te[0](row_tokens, seg.text_positions[None], features[:, torch.tensor(flags).cuda()],
                           labels=row_labels, packed_seq_params=seg).float()
            alone = torch.cat([te[0](tokens[i:i + 1, :n], positions[i:i + 1, :n],
                                     features[:, i:i + 1] if flags[i] else None, labels=labels[i:i + 1, :n]).float()
                               for i, n in enumerate(lengths)], dim=1)
        diff = (packed - alone).abs().max().item()
        rows.append(Row(f"te-vs-local {arch} packed THD", verdict(diff <= loss_tol),
                        f"per-token losses of a packed row vs one sample at a time: max |diff| {diff:.1e} "
                        f"(<= {loss_tol})"))
    return rows


# --- attention backends (child processes) -----------------------------------------------------------------------

BACKENDS = {
    "flash": {"NVTE_FLASH_ATTN": "1", "NVTE_FUSED_ATTN": "0", "NVTE_UNFUSED_ATTN": "0"},
    "fused": {"NVTE_FLASH_ATTN": "0", "NVTE_FUSED_ATTN": "1", "NVTE_UNFUSED_ATTN": "0"},
}


ATTENTION_CASES = ("causal_bottom_right sbhd", "padding_causal_bottom_right thd")
CASE_MARK = "### attention case: "
RESULT_MARK = "### attention results: "
RAN: dict[str, set] = {"attention": set(), "fp8": set(), "skipped": set()}  # for the closing summary


def attention_child(cases: list[str]) -> dict:
    """In a child with one backend forced: TE's output and input gradients against fp32 SDPA references, each
    case on its own (one that raises is reported with its error, and the others still run)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention.bias import causal_lower_right

    from himix_megatron.config import LanguageModelConfig, ParallelConfig, build_transformer_config, vision_model_preset
    from himix_megatron.data.packing import segment_params
    from himix_megatron.model.core_attention import packed_sdpa
    from himix_megatron.model.te_attention import TEMixtureDotProductAttention

    init_single_rank()
    lm = LanguageModelConfig("attn", 512, 1, 8, 4, 1024, 256, 4096, 10000.0, 1e-5, False, False)
    config = build_transformer_config(lm, vision_model_preset("tiny"), ParallelConfig(), params_dtype=torch.bfloat16,
                                      bf16=True)
    attention = TEMixtureDotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal_bottom_right,
                                             attention_type="self").cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    results = {}

    def compare(name, run_te, run_ref, tensors):
        if name not in cases:
            return
        print(CASE_MARK + name, flush=True)
        try:
            leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
            out = run_te(*leaves)
            out.float().square().sum().backward()
            grads = [t.grad for t in leaves]
            ref_leaves = [t.detach().float().clone().requires_grad_(True) for t in tensors]
            ref = run_ref(*ref_leaves)
            ref.square().sum().backward()
            results[name] = {"out": rel(out, ref), "grads": max(rel(a, b.grad) for a, b in zip(grads, ref_leaves))}
        except Exception as e:  # noqa: BLE001 - reported as this case's FAIL; the next case still runs
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        torch.cuda.synchronize()

    m, n, b, heads, groups, hn = 32, 64, 2, 8, 4, 64
    q = torch.randn(m, b, heads, hn, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n + m, b, groups, hn, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n + m, b, groups, hn, generator=g, device="cuda", dtype=torch.bfloat16)

    def sdpa(q, k, v):  # [s, b, h, d] -> [s, b, h * d], bottom-right causal
        qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=causal_lower_right(qq.shape[2], kk.shape[2]),
                                           enable_gqa=True)
        return o.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)

    compare(ATTENTION_CASES[0],
            lambda q, k, v: attention(q, k, v, None, attn_mask_type=AttnMaskType.causal_bottom_right), sdpa, (q, k, v))

    seg = segment_params([10, 24, 6, 24], [True, False, True, True], n).to("cuda")
    t, kv = sum(seg.seqlens_q), sum(seg.seqlens_kv)
    q = torch.randn(t, heads, hn, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(kv, groups, hn, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(kv, groups, hn, generator=g, device="cuda", dtype=torch.bfloat16)
    compare(ATTENTION_CASES[1],
            lambda q, k, v: attention(q, k, v, None, attn_mask_type=AttnMaskType.causal_bottom_right,
                                      packed_seq_params=seg),
            lambda q, k, v: packed_sdpa(q, k, v, seg), (q, k, v))
    return results


def attention_case_problem(backend: str, case: str, capability: tuple, cudnn: tuple, flash_ok: bool) -> Optional[str]:
    """Why `backend` cannot serve `case` on this GPU (a SKIP, not a FAIL), or None. TE 2.9-2.11's rules
    (model/core_attention.thd_backends); the sbhd case has 32 queries and 96 keys, not multiples of 64."""
    from himix_megatron.model.core_attention import thd_backends

    gpu = f"compute capability {capability[0]}.{capability[1]}, cuDNN {'.'.join(map(str, cudnn))}"
    if backend == "flash":
        if not flash_ok:
            return "flash-attn is not installed, or not a version this Transformer Engine accepts"
        return None if tuple(capability) >= (8, 0) else f"{gpu}: flash-attn 2 needs sm80+"
    if case.endswith("thd"):
        return None if "fused" in thd_backends(capability, "0", cudnn, False) else \
            f"{gpu}: cuDNN's thd attention needs sm90+ (not sm120) and cuDNN 9.7 for padding_causal_bottom_right"
    return None if tuple(cudnn) >= (9, 7) else \
        f"{gpu}: cuDNN's causal_bottom_right at lengths that are not multiples of 64 needs cuDNN 9.7"


def attention_environment() -> tuple[tuple, tuple, bool]:
    """(compute capability, cuDNN version as TE loads it, whether TE accepts the installed flash-attn)."""
    import torch
    # backends.py sets FlashAttentionUtils.is_installed on import, for a flash-attn version TE accepts.
    import transformer_engine.pytorch.attention.dot_product_attention.backends  # noqa: F401
    from transformer_engine.pytorch.attention.dot_product_attention.utils import FlashAttentionUtils
    from transformer_engine.pytorch.utils import get_cudnn_version

    return tuple(torch.cuda.get_device_capability()), tuple(get_cudnn_version()), bool(FlashAttentionUtils.is_installed)


def attention_child_env(backend: str, env=None) -> dict:
    """The child's environment: this one without launcher variables, the backend forced, TE's debug log on."""
    return {**single_process_env(os.environ if env is None else env), **BACKENDS[backend],
            "NVTE_DEBUG": "1", "NVTE_DEBUG_LEVEL": "2"}


def check_attention(out: str, backend: str, environment: Optional[tuple] = None) -> list[Row]:
    capability, cudnn, flash_ok = environment or attention_environment()
    rows, cases = [], []
    for case in ATTENTION_CASES:
        problem = attention_case_problem(backend, case, capability, cudnn, flash_ok)
        if problem:
            rows.append(Row(f"attention-{backend} {case}", "SKIP", problem))
            RAN["skipped"].add(f"attention-{backend} {case}")
        else:
            cases.append(case)
    if not cases:
        return rows
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--attention-child", "--cases", *cases],
                          cwd=REPO, env=attention_child_env(backend), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    # The log, split at the child's case markers: which backend TE ran for each case.
    logs, current = {}, None
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith(CASE_MARK):
            current = line[len(CASE_MARK):]
        elif line.startswith(RESULT_MARK):
            results = json.loads(line[len(RESULT_MARK):])
        elif current is not None:
            logs.setdefault(current, []).append(line)
    tolerance = 2e-2  # bf16 inputs against fp32 SDPA, relative norm of the difference
    expected = {"flash": "FlashAttention", "fused": "FusedAttention"}[backend]
    tail = " / ".join(proc.stdout.strip().splitlines()[-3:])
    for case in cases:
        ran = sorted({m.group(0) for m in re.finditer(r"Running with \w+ backend[^\n]*",
                                                      "\n".join(logs.get(case, [])))})
        r = results.get(case)
        if r is None:
            rows.append(Row(f"attention-{backend} {case}", "FAIL", f"child exited {proc.returncode}: {tail}"))
            continue
        if "error" in r:
            rows.append(Row(f"attention-{backend} {case}", "FAIL", r["error"]))
            continue
        # The environment forces the backend (TE raises if it cannot serve the inputs); the debug log confirms it.
        backend_ok = all(expected in line for line in ran)
        ok = r["out"] <= tolerance and r["grads"] <= tolerance and backend_ok
        if backend_ok:
            RAN["attention"].add(f"{backend} ({case})")
        rows.append(Row(f"attention-{backend} {case}", verdict(ok),
                        f"output rel {r['out']:.1e}, input grads rel {r['grads']:.1e} (<= {tolerance}); "
                        f"TE ran: {'; '.join(ran) or f'{expected} (forced; no backend line logged)'}"))
    return rows


# --- fp8 --------------------------------------------------------------------------------------------------------


def recipes_served() -> tuple[list[str], dict[str, str]]:
    """The FP8 recipes this GPU, TE and CUDA serve, and why each other one is not (training/fp8.py)."""
    from himix_megatron.training.fp8 import FP8_RECIPES, gpu_recipe_problem

    problems = {r: gpu_recipe_problem(r) for r in FP8_RECIPES}
    return [r for r in FP8_RECIPES if problems[r] is None], {r: p for r, p in problems.items() if p}


def check_fp8(out: str) -> list[Row]:
    served, problems = recipes_served()
    rows = [Row(f"fp8 {r}", "SKIP", problems[r]) for r in problems]
    RAN["skipped"].update(f"fp8 {r}" for r in problems)
    if not served:
        return rows
    data, tok = synthetic_data(out)
    run = os.path.join(out, "fp8")
    # tiny-112: d_v 384 and every decoder width a multiple of 32 (mxfp8's blocks), N = 63 vision tokens.
    base = tiny_train_args(data, tok, "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "30",
                           "--lr-warmup-fraction", "0.1", vision="tiny-112")
    bf16, bf16_speed = himix_train(base, os.path.join(run, "bf16.log"))
    last = lambda values: sum(values[i] for i in range(26, 31)) / 5  # noqa: E731
    tolerance = 0.05
    for recipe in served:
        try:
            losses, speed = himix_train(base + ["--fp8-format", "hybrid", "--fp8-recipe", recipe],
                                        os.path.join(run, f"{recipe}.log"))
        except RuntimeError as e:  # one recipe failing does not hide the others
            rows.append(Row(f"fp8 {recipe}", "FAIL", str(e).splitlines()[0] + " ... " + str(e).splitlines()[-1]))
            continue
        distance = abs(last(losses) - last(bf16))
        ok = distance <= tolerance and losses[30] < losses[1]
        if ok:
            RAN["fp8"].add(recipe)
        rate = (f"; {last(speed):.1f} samples/s against bf16's {last(bf16_speed):.1f}"
                if all(i in speed and i in bf16_speed for i in range(26, 31)) else "")
        rows.append(Row(f"fp8 {recipe}", verdict(ok),
                        f"mean loss of steps 26-30: {last(losses):.4f}, bf16 {last(bf16):.4f}, |diff| {distance:.4f} "
                        f"(<= {tolerance}); {losses[1]:.3f} -> {losses[30]:.3f}{rate}"))
    return rows


# --- text-only and mixed micro-batches --------------------------------------------------------------------------


def check_text_only(out: str) -> list[Row]:
    """Bugs 1 and 2 of issue 25 on the TE spec: a micro-batch without images, and a mixed one whose vision GEMMs
    get N x 7 = 441 rows, in bf16 and under each FP8 recipe this GPU serves."""
    import torch
    from megatron.core import tensor_parallel

    from himix_megatron.config import ParallelConfig, build_transformer_config, language_model_preset, vision_model_preset
    from himix_megatron.model.himix_model import HiMixModel

    init_single_rank()
    lm, vision = language_model_preset("tiny"), vision_model_preset("tiny-112")  # N = 63
    b, m = 8, 16
    tokens, positions, labels = _batch(lm.vocab_size, b, m, seed=4)
    features = torch.randn(vision.num_features, b, vision.hidden_size, device="cuda", dtype=torch.bfloat16,
                           generator=torch.Generator(device="cuda").manual_seed(5))
    mixed = (True,) * (b - 1) + (False,)
    served, problems = recipes_served()
    rows, reference, base_loss = [], None, None
    for recipe in [None, *served]:
        name = recipe or "bf16"
        try:
            overrides = dict(fp8="hybrid", fp8_recipe=recipe) if recipe else {}
            config = build_transformer_config(lm, vision, ParallelConfig(), params_dtype=torch.bfloat16, bf16=True,
                                              **overrides)
            tensor_parallel.model_parallel_cuda_manual_seed(7)
            model = HiMixModel(config, lm, use_te=True).cuda().to(torch.bfloat16)
            if reference is None:
                reference = {k: v.detach().clone() for k, v in model.named_parameters()}
            else:
                with torch.no_grad():  # the bf16 model's weights
                    for k, v in model.named_parameters():
                        v.copy_(reference[k])
            none = model(tokens, positions, features, labels=labels, image_present=(False,) * b).float()
            none.sum().backward()
            text = model(tokens, positions, None, labels=labels).float()
            model.zero_grad()
            loss = model(tokens, positions, features, labels=labels, image_present=mixed).float()
            loss.sum().backward()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a FAIL with its reason; the other precisions still run
            traceback.print_exc()
            reason = str(e).splitlines()[0] if str(e) else ""
            rows.append(Row(f"text-only {name}", "FAIL", f"{type(e).__name__}: {reason}"))
            continue
        same = (none - text).abs().max().item()
        figures = (f"no-image micro-batch vs text-only forward: max |diff| {same:.1e}; mixed batch (441 vision rows) "
                   f"mean loss {loss.mean().item():.4f}")
        ok = same <= 1e-3 and bool(torch.isfinite(loss).all())
        if recipe is None:
            base_loss = loss.mean().item()
        elif base_loss is not None:
            distance = abs(loss.mean().item() - base_loss)
            figures += f", bf16's {base_loss:.4f}: |diff| {distance:.4f} (<= 0.05)"
            ok = ok and distance <= 0.05
        rows.append(Row(f"text-only {name}", verdict(ok), figures))
        del model
    rows += [Row(f"text-only {r}", "SKIP", p) for r, p in problems.items()]
    return rows


# --- vicuna-width -----------------------------------------------------------------------------------------------


def _step_time(model, tokens, positions, labels, features, repeats: int = 5) -> float:
    import torch

    for i in range(repeats + 2):  # two warm-up steps
        if i == 2:
            torch.cuda.synchronize()
            start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(tokens, positions, features, labels=labels).float().sum().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def check_vicuna_width(out: str) -> list[Row]:
    import torch

    from himix_megatron.config import ParallelConfig, build_transformer_config, language_model_preset, vision_model_preset
    from himix_megatron.data.templates import IMAGE_TOKEN_INDEX
    from himix_megatron.flops import training_flops
    from himix_megatron.model import model_class
    from himix_megatron.training.metrics import detect_peak_flops

    init_single_rank()
    lm = dataclasses.replace(language_model_preset("vicuna-7b"), num_layers=2)
    vision = vision_model_preset("siglip-so400m-384")
    n, m, b = vision.num_features, 64, 8
    tokens, positions, labels = _batch(lm.vocab_size, b, m, seed=3)
    features = torch.randn(n, b, vision.hidden_size, device="cuda", dtype=torch.bfloat16)
    rows, times = [], {}
    served, problems = recipes_served()
    rows += [Row(f"vicuna-width himix fp8 {r}", "SKIP", p) for r, p in problems.items()]
    for arch, precision in (("himix", "bf16"), *(("himix", f"fp8 {r}") for r in served), ("vanilla", "bf16")):
        recipe = precision.split()[-1] if precision != "bf16" else None
        overrides = dict(fp8="hybrid", fp8_recipe=recipe) if recipe else {}
        config = build_transformer_config(lm, vision, ParallelConfig(), arch=arch, params_dtype=torch.bfloat16,
                                          bf16=True, **overrides)
        model = model_class(arch)(config, lm, use_te=True).cuda().to(torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
        text = tokens.clone()
        if arch == "vanilla":  # the image id after the first token (its place changes no cost)
            text[:, 1] = IMAGE_TOKEN_INDEX
        seconds = _step_time(model, text, positions, labels, features)
        flops = b * training_flops(lm, arch, n, m, "finetune", vision.hidden_size)
        peak = detect_peak_flops(None, recipe is not None)
        times[(arch, precision)] = seconds
        rows.append(Row(f"vicuna-width {arch} {precision}", "PASS",
                        f"{b * m / seconds:,.0f} text tokens/s, {flops / seconds / 1e12:.1f} model TFLOP/s"
                        + (f", MFU {flops / seconds / peak:.1%}" if peak else ", MFU: peak unknown")
                        + f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
                        f"(2 layers of 32, micro-batch {b}, 728:64)"))
        del model
        torch.cuda.empty_cache()
    ratio = times[("vanilla", "bf16")] / times[("himix", "bf16")]
    flop_ratio = training_flops(lm, "vanilla", n, m, "finetune", vision.hidden_size) / \
        training_flops(lm, "himix", n, m, "finetune", vision.hidden_size)
    rows.append(Row("vicuna-width vanilla / HiMix", "PASS" if ratio > 1 else "FAIL",
                    f"step-time ratio {ratio:.2f}x against a training-FLOP ratio of {flop_ratio:.2f}x "
                    f"(realization {ratio / flop_ratio:.2f})"))
    return rows


CHECKS: dict[str, Callable[[str], list[Row]]] = {
    "train-resume": check_train_resume,
    "te-vs-local": check_te_vs_local,
    "attention-flash": lambda out: check_attention(out, "flash"),
    "attention-fused": lambda out: check_attention(out, "fused"),
    "fp8": check_fp8,
    "text-only": check_text_only,
    "vicuna-width": check_vicuna_width,
}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="working directory (default: a temporary one)")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--attention-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cases", nargs="+", default=list(ATTENTION_CASES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CHECKS))
        return 0
    rank = launcher_rank(os.environ)
    if rank > 0:
        print(f"gpu_selfcheck: rank {rank} of a multi-process launch; the self-check is one process on one GPU, "
              "rank 0 runs it")
        return 0
    clean = single_process_env(os.environ)  # for this process (init_single_rank never reads it) and its children
    os.environ.clear()
    os.environ.update(clean)
    import torch

    if not torch.cuda.is_available():
        print("gpu_selfcheck: no GPU on this machine; nothing was checked (the checks need CUDA and Transformer "
              "Engine). Run it on a GPU node, e.g. inside the project's container.")
        return 0
    if args.attention_child:
        print(RESULT_MARK + json.dumps(attention_child(args.cases)), flush=True)
        return 0
    from himix_megatron.model.core_attention import te_available

    if not te_available():
        print("gpu_selfcheck: a GPU but no transformer_engine.pytorch: the TE path cannot be checked. FAIL")
        return 1
    out = args.out or tempfile.mkdtemp(prefix="himix-selfcheck-")
    os.makedirs(out, exist_ok=True)
    print(f"gpu_selfcheck on {torch.cuda.get_device_name()} (torch {torch.__version__}), working in {out}",
          flush=True)
    rows, start = [], time.perf_counter()
    for name in args.only or list(CHECKS):
        t0 = time.perf_counter()
        try:
            found = CHECKS[name](out)
        except Exception as e:  # a check that crashes is a FAIL with its reason, and the others still run
            traceback.print_exc()
            found = [Row(name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]
        rows += found
        print(f"  {name}: {', '.join(r.status for r in found)} in {time.perf_counter() - t0:.0f} s", flush=True)
    print(render(rows))
    failed = sum(r.status == "FAIL" for r in rows)
    print(f"gpu_selfcheck: {sum(r.status == 'PASS' for r in rows)} passed, {failed} failed, "
          f"{sum(r.status == 'SKIP' for r in rows)} skipped in {time.perf_counter() - start:.0f} s")
    print(f"attention backends that ran and agreed: {', '.join(sorted(RAN['attention'])) or 'none'}")
    print(f"FP8 recipes that trained within tolerance of bf16: {', '.join(sorted(RAN['fp8'])) or 'none'}"
          + (f"; skipped on this machine: {', '.join(sorted(RAN['skipped']))}" if RAN["skipped"] else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
