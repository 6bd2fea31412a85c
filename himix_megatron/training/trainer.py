"""The training loop: build, (re)load, step, log, evaluate, save.

One step is one global batch: every data-parallel rank reads global_batch / DP samples as
micro-batches, megatron-core's schedule runs forward and backward through the pipeline, the loss is
the mean over every label token of the global batch (megatron-core's `calculate_per_token_loss`),
and one optimizer step follows. A step whose loss or gradient norm is NaN/Inf is skipped (no
update, logged and counted); `--max-bad-steps` consecutive ones save a checkpoint and abort.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from himix_megatron import platform
from himix_megatron.async_save import AsyncSaves
from himix_megatron.checkpoint import (
    DESCRIPTION,
    LATEST,
    MANIFEST,
    carried_files,
    ModelDescription,
    build_model,
    checkpoint_tokenizer_dir,
    load_checkpoint,
    prune_checkpoints,
    read_description,
    read_metadata,
    resolve,
    save_checkpoint,
    start_checkpoint_helpers,
)
from himix_megatron.config import ConfigError, ParallelConfig, language_model_preset, vision_model_preset
from himix_megatron.data.templates import resolve_prompt
from himix_megatron.parallel.pipeline import forward_backward
from himix_megatron.training import data as training_data
from himix_megatron.training.dp_timing import ForwardBackwardTimer
from himix_megatron.training.config import (
    TrainConfig,
    check,
    encoder_tensor_parallel_size,
    gamma_mod_settings,
    packing_max_images,
)
from himix_megatron.training import fp8
from himix_megatron.training.metrics import MetricsLogger, detect_peak_flops
from himix_megatron.training.optimizer import apply_stage, build_optimizer, wrap_ddp

log = logging.getLogger(__name__)

DONE = "DONE"  # written to --save when a run has trained all its iterations


class TrainingAborted(RuntimeError):
    """Too many consecutive NaN/Inf steps; a checkpoint was saved first when --save was given."""


@dataclass
class Run:
    cfg: TrainConfig
    description: ModelDescription
    chunks: list
    encoder: Optional[torch.nn.Module]
    optimizer: object
    scheduler: object
    tokenizer: object
    tokenizer_dir: Optional[str]
    template: str
    train_iters: int
    global_batch_size: int
    num_microbatches: int
    iteration: int = 0
    consumed_samples: int = 0
    resume_loader_state: Optional[dict] = None
    carried_files: Optional[dict] = None  # checkpoint files that every later save copies forward
    gamma_mod: Optional[dict] = None  # gamma-MoD: the checkpoint record (model/gamma_mod.py), None for dense
    mod_system_tokens: int = 0  # gamma-MoD: the template's system-header tokens, routable like the image


def _has_checkpoint(path: Optional[str]) -> bool:
    """Whether --load names something to load. A missing or empty directory (or one holding only the
    debris of a crashed first save) is a first start, as under --save D --load D; anything else must
    then load, or fail with the reason."""
    if path is None or not os.path.isdir(path):
        return False
    return any(n == LATEST or n.startswith("iter_") or n in (DESCRIPTION, MANIFEST) for n in os.listdir(path))


def _description(cfg: TrainConfig, checkpoint: Optional[str]) -> ModelDescription:
    if checkpoint is not None:
        return read_description(checkpoint)
    vision = vision_model_preset(cfg.vision_model)
    if not vision.name.startswith("tiny"):
        raise ConfigError(f"--vision-model {cfg.vision_model} without --load would train on a randomly initialised "
                          "encoder; import the SigLIP weights with tools/convert_checkpoint.py and pass --load")
    return ModelDescription(cfg.arch, language_model_preset(cfg.model), vision, cfg.template)


def check_gpu(cfg: TrainConfig) -> None:
    """What only this machine's GPU and Transformer Engine can tell, refused before anything is built."""
    if not torch.cuda.is_available():
        return
    if cfg.fp8_format is not None:
        problem = fp8.gpu_recipe_problem(cfg.fp8_recipe)
        if problem:
            raise ConfigError(f"{problem}; choose another --fp8-recipe, or drop --fp8-format")


def thd_attention(cfg: TrainConfig, arch: str) -> bool:
    """Whether the TE spec's attention can run `thd` segments on this GPU (True off the TE spec: the local
    packed attention always can). Packing needs them; refused before step 1 with the fix where no backend can
    (core_attention.thd_backends). Vanilla's unpacked batches need neither segments nor a mask (a text-only
    sample holds no image id: model/vanilla.py)."""
    from himix_megatron.model.core_attention import gpu_thd_problem, te_available

    if not (torch.cuda.is_available() and te_available()):
        return True
    problem = gpu_thd_problem()
    if problem is None:
        return True
    if cfg.packing_seq_length is not None:
        raise ConfigError(f"--packing-seq-length: {problem}; or train unpacked (drop --packing-seq-length)")
    if arch == "vanilla":
        return False
    log.warning("%s; HiMix attends to micro-batches with text-only samples through an explicit mask instead "
                "(TE's unfused backend: slower)", problem)
    return False


def setup(cfg: TrainConfig) -> Run:
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from himix_megatron.model.core_attention import te_available

    parallel = ParallelConfig(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                              cfg.virtual_pipeline_model_parallel_size, cfg.sequence_parallel,
                              encoder_tensor_parallel_size(cfg))
    launch = platform.discover_launch()
    check(cfg, launch.world_size, te_available=te_available(), cuda=torch.cuda.is_available())
    platform.initialize(parallel, seed=cfg.seed, launch=launch)
    check_gpu(cfg)  # after initialize: asks this rank's GPU (set_device), not GPU 0

    # Resolved once, so every read below comes from the same iteration even if a save lands meanwhile.
    checkpoint = resolve(cfg.load) if _has_checkpoint(cfg.load) else None
    description = _description(cfg, checkpoint)
    fp8.check_layout(cfg, description)
    thd = thd_attention(cfg, description.arch)
    positions = description.language.max_position_embeddings
    if cfg.seq_length > positions:
        raise ConfigError(f"--seq-length {cfg.seq_length} exceeds the model's {positions} positions "
                          f"({description.language.name}): a sample (a packed segment) could not be encoded")
    tokenizer_dir = cfg.tokenizer_model or (checkpoint_tokenizer_dir(checkpoint) if checkpoint else None)
    if tokenizer_dir is None:
        raise ConfigError("--tokenizer-model is required (the checkpoint has no tokenizer files)")
    tokenizer = training_data.load_tokenizer_checked(tokenizer_dir, description.language)
    prompt = resolve_prompt(tokenizer, cfg.template, cfg.system_prompt, recorded_template=description.template,
                            recorded_system=description.system_prompt, where=checkpoint or "--load",
                            warn=functools.partial(print, flush=True) if checkpoint and launch.rank == 0 else None)
    # From here on cfg states the exact prompt, and every checkpoint records it.
    template, cfg = prompt.name, dataclasses.replace(cfg, template=prompt.name, system_prompt=prompt.system_prompt)
    description = dataclasses.replace(description, template=template, system_prompt=prompt.system_prompt)

    overrides = dict(calculate_per_token_loss=True)
    recorded = read_metadata(checkpoint)["train_state"].get("gamma_mod") if checkpoint is not None else None
    mod = gamma_mod_settings(cfg, description.arch, description.language.num_layers, recorded)
    system_header = ()
    if mod is not None:
        from himix_megatron.model.gamma_mod import system_header_ids

        system_header = system_header_ids(tokenizer, template, cfg.system_prompt)
        overrides.update(mod, mod_system_prefix=system_header)
    if cfg.recompute_granularity:
        overrides.update(recompute_granularity=cfg.recompute_granularity)
        if cfg.recompute_granularity == "full":
            overrides.update(recompute_method=cfg.recompute_method, recompute_num_layers=cfg.recompute_num_layers)
    # megatron-core builds the recipe from these fields and enters TE's fp8_autocast around every layer; TE
    # modules only, so the local spec never gets here (check() refuses). The encoder's config has none of them.
    overrides.update(fp8.transformer_overrides(cfg))
    chunks, encoder = build_model(description, parallel, use_cpu_initialization=not torch.cuda.is_available(),
                                  params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32, **overrides)
    if not thd:  # HiMix attends to a mixed batch through an explicit mask instead (sbhd: every backend)
        for chunk in chunks:
            chunk.mixed_batches_as_segments = False
    trainable = apply_stage(chunks, cfg.stage)
    chunks = wrap_ddp(chunks, cfg)
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    if cfg.overlap_grad_reduce:
        config.no_sync_func = chunks[0].no_sync

    dp = parallel_state.get_data_parallel_world_size()
    gbs = cfg.global_batch_size or cfg.micro_batch_size * dp
    train_iters = training_data.train_iters(cfg, gbs, dp, tokenizer, template, description)
    optimizer, scheduler = build_optimizer(chunks, cfg, train_iters)
    run = Run(cfg, description, chunks, encoder, optimizer, scheduler, tokenizer, tokenizer_dir, template,
              train_iters, gbs, gbs // (cfg.micro_batch_size * dp))
    if mod is not None:
        from himix_megatron.model.gamma_mod import checkpoint_record

        run.gamma_mod, run.mod_system_tokens = checkpoint_record(config), len(system_header)
    if launch.rank == 0:
        batches = (f"packed into rows of <= {cfg.packing_seq_length} text tokens, <= {packing_max_images(cfg)} images"
                   if cfg.packing_seq_length else
                   f"{run.num_microbatches} micro-batches of {cfg.micro_batch_size} per DP rank, padded to "
                   + ("--seq-length" if cfg.pad_to_seq_length else "their longest"))
        print(f"himix-train: {description.arch} {description.language.name} + {description.vision.name}, "
              f"stage {cfg.stage}, TP={parallel.tensor_model_parallel_size} PP={parallel.pipeline_model_parallel_size}"
              f" DP={dp}, {trainable:,} trainable parameters, {train_iters} iterations of {gbs} samples "
              f"({batches})", flush=True)
        if run.gamma_mod is not None:
            print(f"gamma-MoD: MoD layers {run.gamma_mod['mod_layers']}, capacity {run.gamma_mod['mod_capacity']} "
                  f"of the image + {run.mod_system_tokens} system-prompt tokens, aux loss x "
                  f"{run.gamma_mod['mod_aux_loss_coeff']}, inference threshold {run.gamma_mod['mod_threshold']}, "
                  f"a skipped token skips the {run.gamma_mod['mod_skip']}",
                  flush=True)
    if checkpoint is not None:
        _load(run, checkpoint)
    if run.gamma_mod is not None:
        from himix_megatron.model.gamma_mod import broadcast_router

        broadcast_router(run.chunks)  # a fresh router is initialised differently on each pipeline stage
    return run


def _load(run: Run, checkpoint: str) -> None:
    cfg = run.cfg
    meta = read_metadata(checkpoint)
    same_stage = meta["train_state"].get("stage") == cfg.stage
    model_only = cfg.finetune or not same_stage or "optimizer" not in meta["contents"]
    fresh_router = nullcontext()
    if run.gamma_mod is not None and not _has_router(checkpoint):
        # A dense vanilla checkpoint (the usual start: gamma-MoD adapts a trained LLaVA in finetuning).
        if not model_only:
            raise ConfigError(f"--gamma-mod: {checkpoint} is a dense model of this stage, whose optimizer state has "
                              "no router; load its weights only with --finetune")
        from himix_megatron.model.gamma_mod import router_absent

        fresh_router = router_absent(run.chunks)
    with fresh_router:
        result = load_checkpoint(checkpoint, run.chunks, encoder=run.encoder,
                                 optimizer=None if model_only or cfg.no_load_optim else run.optimizer,
                                 scheduler=None if model_only else run.scheduler,
                                 load_rng=not (model_only or cfg.no_load_rng))
    run.carried_files = carried_files(result["dir"])
    if not model_only:
        run.iteration = result["iteration"]
        run.consumed_samples = int(meta["train_state"]["consumed_samples"])
        run.resume_loader_state = (result["rank_state"] or {}).get("loader")
    if torch.distributed.get_rank() == 0:
        what = "weights only, starting at iteration 0" if model_only else f"resuming at iteration {run.iteration}"
        print(f"loaded {result['dir']} ({', '.join(result['loaded'])}): {what}", flush=True)


def _has_router(checkpoint: str) -> bool:
    from megatron.core import dist_checkpointing

    return any(key.endswith("mod_router.weight") for key in dist_checkpointing.load_tensors_metadata(checkpoint))


@contextmanager
def _timed(run: Run, name: str, log_level: int):
    """Megatron-LM's timer `name` around the block, under --log-timers-to-tensorboard (megatron-core's Timers, kept
    where its schedules read them: the model config's `timers`)."""
    timers = run.chunks[0].config.timers
    timer = timers(name, log_level=log_level) if timers is not None else None
    if timer is not None:
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.stop()


def _start_timers(run: Run):
    """--log-timers-to-tensorboard: megatron-core's Timers into the configs its schedules, gradient finalisation
    and optimizer read."""
    if not run.cfg.log_timers_to_tensorboard:
        return None
    from megatron.core.timers import Timers

    timers = Timers(run.cfg.timing_log_level, "minmax")
    for chunk in run.chunks:
        chunk.config.timers = timers
    for optimizer in getattr(run.optimizer, "chained_optimizers", [run.optimizer]):
        optimizer.config.timers = timers
    return timers


def _save(run: Run, loader, async_saves=None) -> None:
    """Save now (synchronously), or hand the save to `async_saves`; rank 0 reports once it is complete."""
    with _timed(run, "save-checkpoint", 0):
        _save_now(run, loader, async_saves)


def _save_now(run: Run, loader, async_saves) -> None:
    cfg = run.cfg
    iteration, start, blocked = run.iteration, time.monotonic(), {}

    def complete(saved: str) -> None:
        if torch.distributed.get_rank() != 0:
            return
        took = time.monotonic() - start
        how = (f"written in the background in {took:.2f} s; training blocked {blocked['s']:.2f} s" if blocked
               else f"training blocked {took:.2f} s")
        print(f"saved checkpoint at iteration {iteration} to {cfg.save} ({how})", flush=True)
        # Only once the new checkpoint is complete (renamed, `latest` moved).
        deleted = prune_checkpoints(cfg.save, retain_interval=cfg.save_retain_interval, keep_last=cfg.save_keep_last)
        if deleted:
            print(f"retention: deleted {', '.join(deleted)} (kept {os.path.basename(saved)})", flush=True)

    save_checkpoint(
        cfg.save, run.chunks, run.description, iteration=iteration, encoder=run.encoder,
        optimizer=run.optimizer, scheduler=run.scheduler,
        train_state={"stage": cfg.stage, "consumed_samples": run.consumed_samples,
                     "train_iters": run.train_iters, "template": run.template,
                     **({"gamma_mod": run.gamma_mod} if run.gamma_mod is not None else {})},
        rank_state={"loader": loader.state_dict()}, tokenizer_dir=_tokenizer_files(run.tokenizer_dir),
        extra_files=run.carried_files, optimizer_format=cfg.ckpt_optimizer_format,
        async_saves=async_saves, on_complete=complete,
    )
    if async_saves is not None:
        blocked["s"] = time.monotonic() - start


class StopRequests:
    """--exit-signal-handler and --exit-duration-in-mins: a reason to stop, agreed by every rank.

    The handler only sets a flag; the loop finishes the step it is in. Ranks receive a signal at slightly
    different moments (or not at all), so after each step one all-reduce (MAX) of the local flag decides
    for everyone, and all ranks stop, save and exit at the same iteration.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.received, self.start = cfg, None, time.monotonic()
        self.active = cfg.exit_signal_handler or cfg.exit_duration_in_mins is not None
        if cfg.exit_signal_handler:
            signal.signal(signal.Signals[cfg.exit_signal], self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self) -> Optional[str]:
        """Collective when active. The reason to stop now, or None."""
        if not self.active:
            return None
        elapsed = (time.monotonic() - self.start) / 60
        over = self.cfg.exit_duration_in_mins is not None and elapsed >= self.cfg.exit_duration_in_mins
        flags = torch.tensor([self.received is not None, over], dtype=torch.int32, device=platform.device())
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[0]:
            return f"{self.cfg.exit_signal} received"
        if flags[1]:
            return f"--exit-duration-in-mins {self.cfg.exit_duration_in_mins} reached"
        return None


def _tokenizer_files(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


STEP_STATS = ("loss_sum", "label_tokens", "text_tokens", "samples", "model_flops", "computed_tokens", "rows")


def _reduce_step_stats(stats: Optional[torch.Tensor], microbatches, flops_of) -> dict:
    """STEP_STATS summed over the global batch, on every rank. `flops_of(text_length)`: one sample's model FLOPs."""
    from megatron.core import parallel_state

    counted = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
               and parallel_state.get_tensor_model_parallel_rank() == 0)
    values = torch.zeros(len(STEP_STATS), dtype=torch.float64, device=platform.device())  # NCCL: on the GPU
    if counted:
        lengths = [int(n) for mb in microbatches for n in mb.lengths]
        values[0], values[1] = stats[:, 0].double().sum(), stats[:, 1].double().sum()
        values[2], values[3] = sum(lengths), len(lengths)  # lengths stay on the CPU: no device sync
        values[4] = sum(flops_of(n) for n in lengths)
        values[5] = sum(mb.tokens.numel() for mb in microbatches)
        values[6] = sum(mb.tokens.shape[0] for mb in microbatches)
    torch.distributed.all_reduce(values)
    return dict(zip(STEP_STATS, values.tolist()))


def _reduce_mod_aux_loss(run: Run) -> float:
    """gamma-MoD's aux loss of the step (in the objective besides the LM loss): coeff x the router cross
    entropies summed over MoD layers, averaged over the global batch's micro-batches. Every stage computes its
    own layers' terms; TP ranks compute the same ones, so TP rank 0 counts them."""
    from megatron.core import parallel_state

    from himix_megatron.model.gamma_mod import pop_aux_loss

    local = pop_aux_loss(run.chunks)
    value = torch.tensor([local if parallel_state.get_tensor_model_parallel_rank() == 0 else 0.0],
                         dtype=torch.float64, device=platform.device())
    torch.distributed.all_reduce(value)
    return float(value) / (run.num_microbatches * parallel_state.get_data_parallel_world_size())


def _poison_gradients(chunks) -> None:
    """--inject-nan-at: what a numerical blow-up looks like to the step (testing aid)."""
    for chunk in chunks:
        for buffer in chunk.buffers:
            buffer.grad_data.fill_(math.nan)


def train_step(run: Run, microbatches, inject_nan: bool = False, flops_of=lambda n: 0.0) -> tuple[dict, Optional[float], bool]:
    """Returns (reduced STEP_STATS, grad norm, skipped)."""
    for chunk in run.chunks:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    encode = training_data.cached_features_encoder(run.cfg) if run.cfg.vision_features else run.encoder
    with ForwardBackwardTimer(run.chunks[0].config) as timer:
        stats = forward_backward(run.chunks, microbatches, encode, vision_tokens=run.description.vision.num_features)
    reduced = _reduce_step_stats(stats, microbatches, flops_of)
    reduced["dp_time_spread"] = timer.spread()
    if run.gamma_mod is not None:
        reduced["mod_aux_loss"] = _reduce_mod_aux_loss(run)
    if inject_nan:
        reduced["loss_sum"] = math.nan
        _poison_gradients(run.chunks)
    # The norm is checked before the update: megatron's clip would turn a NaN norm into NaN weights.
    run.optimizer.prepare_grads()
    grad_norm = run.optimizer.get_grad_norm()
    if not (math.isfinite(reduced["loss_sum"]) and grad_norm is not None and math.isfinite(grad_norm)):
        return reduced, grad_norm, True
    with _timed(run, "optimizer", 1):
        ok, _, _ = run.optimizer.step()
    if not ok:
        return reduced, grad_norm, True
    run.scheduler.step(increment=1)
    return reduced, grad_norm, False


def train(cfg: TrainConfig) -> dict:
    """Run the configured training; returns the final metrics (rank 0's view)."""
    from himix_megatron.flops import gamma_mod_training_flops, training_flops
    from himix_megatron.training import evaluate as evaluation

    run = setup(cfg)
    loader = training_data.build_train_loader(run)
    if run.resume_loader_state is not None:
        loader.load_state_dict(run.resume_loader_state)
    description = run.description

    @functools.lru_cache(maxsize=None)
    def flops_of(text_length: int) -> float:  # one sample's model FLOPs at its real length
        if run.gamma_mod is not None:  # MoD layers at their training capacity
            return gamma_mod_training_flops(
                description.language, description.vision.num_features, text_length, cfg.stage,
                mod_layers=run.gamma_mod["mod_layers"], capacity=run.gamma_mod["mod_capacity"],
                system_tokens=run.mod_system_tokens, router_bias=run.gamma_mod["mod_router_bias"],
                skip=run.gamma_mod["mod_skip"])
        return training_flops(description.language, description.arch, description.vision.num_features, text_length,
                              cfg.stage, description.vision.hidden_size)

    wandb = None
    if cfg.wandb_project:
        from himix_megatron.training.wandb_run import WandbWriter, run_config

        config = run_config(cfg, description, world_size=torch.distributed.get_world_size(),
                            data_parallel_size=cfg.data_parallel_size, train_iters=run.train_iters,
                            global_batch_size=run.global_batch_size, num_microbatches=run.num_microbatches,
                            start_iteration=run.iteration)
        wandb = functools.partial(WandbWriter, cfg, config, resumed=run.iteration > 0)
    metrics = MetricsLogger(
        rank=torch.distributed.get_rank(), total_iters=run.train_iters, start_iter=run.iteration,
        world_size=torch.distributed.get_world_size(),
        peak_flops=detect_peak_flops(cfg.peak_flops, cfg.fp8_format is not None),
        tensorboard_dir=cfg.tensorboard_dir, progress=cfg.progress, log_interval=cfg.log_interval,
        wandb=wandb, timers=_start_timers(run), timing_log_level=cfg.timing_log_level,
        log_memory=cfg.log_memory_to_tensorboard)
    batches = training_data.step_stream(run, loader)
    bad_in_a_row, result, history = 0, {}, []
    mod_aux_window = []  # gamma-MoD: the aux loss of the steps since the last log line
    stop = min(run.train_iters, cfg.exit_interval or run.train_iters)
    if cfg.save:
        start_checkpoint_helpers()
    async_saves = AsyncSaves() if cfg.async_save else None
    requests, stopped = StopRequests(cfg), None
    while run.iteration < stop:
        with _timed(run, "batch-generator", 2):
            microbatches = next(batches)
        run.iteration += 1
        reduced, grad_norm, skipped = train_step(run, microbatches, run.iteration in cfg.inject_nan_at, flops_of)
        run.consumed_samples += run.global_batch_size
        loss = reduced["loss_sum"] / max(reduced["label_tokens"], 1)
        bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        if async_saves is not None:
            async_saves.finish(blocking=False)  # completes the save in flight once every rank's writer is done
        history.append({"iteration": run.iteration, "loss": loss, "grad_norm": grad_norm, "skipped": skipped})
        if "mod_aux_loss" in reduced:  # logged apart from the LM loss, which `loss` stays
            history[-1]["mod_aux_loss"] = reduced["mod_aux_loss"]
            mod_aux_window.append(reduced["mod_aux_loss"])
        if skipped:
            metrics.print(f"iteration {run.iteration}: loss {loss} / grad norm {grad_norm} is not finite; "
                          f"step skipped ({bad_in_a_row} in a row)")
        metrics.data_parallel_balance((loader.last_plan or {}).get("imbalance"), reduced["dp_time_spread"])
        metrics.step(run.iteration, loss_sum=reduced["loss_sum"], label_tokens=reduced["label_tokens"],
                     text_tokens=int(reduced["text_tokens"]), samples=int(reduced["samples"]),
                     model_flops=reduced["model_flops"], computed_tokens=int(reduced["computed_tokens"]),
                     rows=int(reduced["rows"]), grad_norm=grad_norm, skipped=skipped,
                     lr=run.optimizer.param_groups[0]["lr"], loader_stats=loader.stats())
        if mod_aux_window and run.iteration % cfg.log_interval == 0:
            mean = sum(mod_aux_window) / len(mod_aux_window)
            metrics.print(f"iteration {run.iteration:6d} | gamma-MoD aux loss {mean:.4f} (in the objective besides "
                          f"the LM loss above, averaged over the last {len(mod_aux_window)} steps)")
            metrics.scalar("train/mod_aux_loss", mean, run.iteration)
            mod_aux_window = []
        if bad_in_a_row >= cfg.max_bad_steps:
            if cfg.save:
                _save(run, loader, async_saves)
                if async_saves is not None:
                    async_saves.close()
            metrics.close()
            raise TrainingAborted(f"{bad_in_a_row} consecutive steps with a NaN/Inf loss or gradient norm "
                                  f"(iteration {run.iteration})" + (f"; checkpoint saved to {cfg.save}" if cfg.save else ""))
        if cfg.eval_interval and run.iteration % cfg.eval_interval == 0:
            result = evaluation.evaluate(run, cfg.valid_data_path, metrics)
        if cfg.save and cfg.save_interval and run.iteration % cfg.save_interval == 0:
            _save(run, loader, async_saves)
        if cfg.inject_signal_at == run.iteration and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.Signals[cfg.exit_signal])
        stopped = requests.agreed()
        if stopped:
            metrics.print(f"stopping at iteration {run.iteration} of {run.train_iters}: {stopped}")
            break
    if cfg.save and not (cfg.save_interval and run.iteration % cfg.save_interval == 0):
        _save(run, loader, async_saves)
    if async_saves is not None:
        async_saves.close()  # the last checkpoint complete before DONE, the evaluation and the exit
    if cfg.save and run.iteration == run.train_iters and torch.distributed.get_rank() == 0:
        open(os.path.join(cfg.save, DONE), "w").close()  # the whole schedule ran: launch scripts stop requeueing
    if stopped:
        metrics.close()
        return {"iteration": run.iteration, "history": history, "skipped_steps": metrics.skipped_total,
                "stopped": stopped}
    if cfg.valid_data_path and not (cfg.eval_interval and run.iteration % cfg.eval_interval == 0):
        result = evaluation.evaluate(run, cfg.valid_data_path, metrics)
    metrics.close()
    return {"iteration": run.iteration, "history": history, "skipped_steps": metrics.skipped_total, **result}
