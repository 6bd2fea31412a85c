"""Checkpoints: megatron-core dist_checkpointing, written atomically, verified before they are loaded.

Layout of `--save DIR`:

    DIR/latest                  "iter_0000200": written last, by rename, so it only ever names a
                                checkpoint that is complete
    DIR/iter_0000200/           one dist_checkpointing directory, plus
        himix.json              what the model is (arch, language, vision, template), the parallel
                                layout it was saved from, and what the checkpoint holds
        manifest.json           every file and its size, written after all of them
        tokenizer/              the tokenizer files, so a checkpoint is self-describing

A checkpoint is first written to DIR/.tmp-iter_0000200 by all ranks and renamed by rank 0 only
once every rank has finished, so a crash mid-save leaves the previous checkpoint untouched and
`latest` still pointing at it. The manifest catches what renames cannot: a checkpoint copied
or synced incompletely. Loading a save directory whose newest checkpoint fails the check logs why
and falls back to the newest one that passes.

Parameters are stored by megatron-core's global sharded keys, so the model reloads at any TP/PP.
The optimizer state reshards only if it was saved as `fully_reshardable`; the default
`dp_reshardable` (Megatron-LM's default: cheaper to write) reloads at the same TP/PP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from himix_megatron.config import LanguageModelConfig, ParallelConfig, VisionModelConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "latest"
DESCRIPTION = "himix.json"
MANIFEST = "manifest.json"
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
# Files that travel with a model from checkpoint to checkpoint: the SigLIP tensors our encoder does
# not use (last layer, post-norm, head), kept by the import so that an export is a whole SigLIP.
CARRIED_FILES = ("hf_vision_extra.safetensors",)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the file or field."""


@dataclass(frozen=True)
class ModelDescription:
    """Everything needed to rebuild the model, so `--load` needs no architecture flags."""

    arch: str
    language: LanguageModelConfig
    vision: VisionModelConfig
    template: Optional[str] = None
    # Rows of the (padded) embedding; None until the model is first built. Recorded so that the
    # model reloads at another TP (Megatron-LM's padding depends on the TP it is built at).
    padded_vocab_size: Optional[int] = None
    # The exact system prompt the template rendered in training ("" for none); None in checkpoints written
    # before it was recorded. Exports and himix-eval prompt with it.
    system_prompt: Optional[str] = None

    def to_dict(self) -> dict:
        return {"arch": self.arch, "language": dataclasses.asdict(self.language),
                "vision": dataclasses.asdict(self.vision), "template": self.template,
                "padded_vocab_size": self.padded_vocab_size, "system_prompt": self.system_prompt}

    @classmethod
    def from_dict(cls, d: dict, where: str = "himix.json") -> "ModelDescription":
        try:
            system = d.get("system_prompt")
            if system is not None and not isinstance(system, str):
                raise TypeError(f"system_prompt is {type(system).__name__}, not a string")
            return cls(d["arch"], LanguageModelConfig(**d["language"]), VisionModelConfig(**d["vision"]),
                       d.get("template"), d.get("padded_vocab_size"), system)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: not a model description ({e})") from e


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# --- finding a complete checkpoint ---------------------------------------------------------------


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is partial") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is truncated") from None


def verify(iter_dir: str) -> dict:
    """Check every file of the manifest is there with its size; returns himix.json's contents."""
    manifest = _read_json(os.path.join(iter_dir, MANIFEST))
    for name, size in manifest["files"].items():
        path = os.path.join(iter_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{iter_dir}: {name} is missing: the checkpoint is partial")
        if os.path.getsize(path) != size:
            raise CheckpointError(f"{iter_dir}: {name} has {os.path.getsize(path)} bytes, the manifest says "
                                  f"{size}: the checkpoint is truncated")
    meta = _read_json(os.path.join(iter_dir, DESCRIPTION))
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{iter_dir}/{DESCRIPTION}: format_version {meta.get('format_version')}, "
                              f"this code reads {FORMAT_VERSION}")
    return meta


def resolve(load_dir: str) -> str:
    """The iteration directory to load: `load_dir` itself if it is one, else the newest complete one."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    if os.path.exists(os.path.join(load_dir, DESCRIPTION)) or os.path.exists(os.path.join(load_dir, MANIFEST)):
        verify(load_dir)  # an explicitly named checkpoint must be whole: no silent fallback
        return load_dir
    candidates = sorted((d for d in os.listdir(load_dir) if d.startswith("iter_")), reverse=True)
    latest = os.path.join(load_dir, LATEST)
    if os.path.exists(latest):
        with open(latest, encoding="utf-8") as f:
            named = f.read().strip()
        if named in candidates:
            candidates.remove(named)
        candidates.insert(0, named)
    refused = []
    for name in candidates:
        try:
            verify(os.path.join(load_dir, name))
        except CheckpointError as e:
            refused.append(str(e))
            log.error("refusing checkpoint %s", e)
            continue
        if refused:
            log.warning("loading %s instead of the newer, unusable checkpoint(s) above", name)
        return os.path.join(load_dir, name)
    raise CheckpointError(f"--load {load_dir}: no complete checkpoint" + "".join(f"\n  {r}" for r in refused))


def prune_checkpoints(save_dir: str, *, retain_interval: Optional[int] = None,
                      keep_last: Optional[int] = None) -> list[str]:
    """Delete the complete checkpoints that no retention rule keeps; returns the deleted directory names.

    Kept: the one `latest` names (the newest complete one), every iteration that is a multiple of
    `retain_interval` (Megatron-LM's --save-retain-interval), and the `keep_last` newest. Only whole
    `iter_N` directories are candidates, so a save in progress (`.tmp-iter_N`) is never touched. Run after
    a save completes; a deletion that fails is logged and skipped, never fatal.
    """
    if retain_interval is None and keep_last is None:
        return []
    latest = os.path.join(save_dir, LATEST)
    newest = open(latest, encoding="utf-8").read().strip() if os.path.exists(latest) else None
    found = sorted((int(d[len("iter_"):]), d) for d in os.listdir(save_dir)
                   if re.fullmatch(r"iter_\d+", d) and os.path.isfile(os.path.join(save_dir, d, MANIFEST)))
    keep = {newest} | {d for _, d in found[len(found) - keep_last:]} if keep_last else {newest}
    if retain_interval:
        keep |= {d for i, d in found if i % retain_interval == 0}
    deleted = []
    for _, name in found:
        if name in keep:
            continue
        try:
            shutil.rmtree(os.path.join(save_dir, name))
            deleted.append(name)
        except OSError as e:
            log.warning("retention: could not delete %s: %s", os.path.join(save_dir, name), e)
    return deleted


def read_description(load_dir: str) -> ModelDescription:
    iter_dir = resolve(load_dir)
    return ModelDescription.from_dict(_read_json(os.path.join(iter_dir, DESCRIPTION))["model"],
                                      os.path.join(iter_dir, DESCRIPTION))


def read_metadata(load_dir: str) -> dict:
    return _read_json(os.path.join(resolve(load_dir), DESCRIPTION))


def carried_files(iter_dir: str) -> dict[str, str]:
    """CARRIED_FILES present in a checkpoint, for the next save to copy forward."""
    return {name: os.path.join(iter_dir, name) for name in CARRIED_FILES
            if os.path.isfile(os.path.join(iter_dir, name))}


def checkpoint_tokenizer_dir(load_dir: str) -> Optional[str]:
    path = os.path.join(resolve(load_dir), "tokenizer")
    return path if os.path.isdir(path) else None


# --- the sharded state ---------------------------------------------------------------------------


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)  # megatron DDP keeps the model in .module


def _spec(model_chunks) -> str:
    """Which layer spec the model was built with: "te" (Transformer Engine) or "local"."""
    return "te" if getattr(_unwrap(model_chunks[0]), "use_te", False) else "local"


EXTRA_STATE = "_extra_state"


def without_extra_state(state: dict) -> tuple[dict, int]:
    """`state` without Transformer Engine's `_extra_state` entries (FP8 scaling metadata), and how many.

    Local and TE checkpoints share every weight key (megatron's local specs map their norms onto TE's fused
    names), but each TE module also saves an `_extra_state`. A TE model loading a local checkpoint has no
    such entry to read: it starts its FP8 history fresh, as after TE's own initialisation. (A local model
    loading a TE checkpoint never asks for them.)
    """
    dropped = 0

    def walk(d: dict) -> dict:
        nonlocal dropped
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = walk(v)
            elif k.endswith(EXTRA_STATE):
                dropped += 1
            else:
                out[k] = v
        return out

    return walk(state), dropped


def _load_module(module: torch.nn.Module, state: dict, strict: bool, extra_state_missing: bool, what: str) -> None:
    result = module.load_state_dict(state, strict=strict and not extra_state_missing)
    if strict and extra_state_missing:
        missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{what}: missing keys {missing}, unexpected keys {result.unexpected_keys}")


def _model_state(model_chunks: Sequence[torch.nn.Module], encoder) -> dict:
    # Keys inside are megatron-core's global sharded keys (layer numbers offset per stage), so the
    # per-chunk nesting here does not tie the checkpoint to a pipeline layout.
    state = {}
    for i, chunk in enumerate(model_chunks):
        state["model" if len(model_chunks) == 1 else f"model{i}"] = _unwrap(chunk).sharded_state_dict()
    if encoder is not None:
        state["vision_encoder"] = encoder.sharded_state_dict(prefix="vision_encoder.")
    return state


def _per_rank_object(key: str, value):
    """A value every rank saves and reloads for itself (RNG states, loader positions)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return ShardedObject(key, value, (world,), (rank,), replica_id=0)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _parallel_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "data_parallel_size": ps.get_data_parallel_world_size(),
            "world_size": torch.distributed.get_world_size()}


# --- save ----------------------------------------------------------------------------------------


def _manager_process_setup() -> None:
    """Runs in megatron-core's results-queue Manager process (spawned, so it inherits no handler)."""
    import ctypes
    import signal

    # A preemption signal goes to every process of the job step (SLURM; torchrun signals the workers'
    # process groups): the rank finishes its step and saves, so this helper must not die of it meanwhile.
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    try:  # ...but it must die with its rank, killed or not, instead of outliving the run (Linux)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_checkpoint_helpers() -> None:
    """dist_checkpointing's writers report through a queue served by a Manager process it spawns on the first
    save (filesystem_async._get_write_results_queue, megatron-core 0.16.1). Start that Manager here instead,
    ignoring preemption signals and tied to this process's life. The trainer calls this before its first step,
    since a signal that lands while the Manager is still starting would kill it; saves call it too."""
    import multiprocessing.managers

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_manager_process_setup)
        filesystem_async._results_queue = manager.Queue()
        filesystem_async._himix_results_manager = manager  # keeps the Manager alive with the module


def save_checkpoint(save_dir: str, model_chunks: Sequence[torch.nn.Module], description: ModelDescription, *,
                    iteration: int = 0, encoder=None, optimizer=None, scheduler=None,
                    train_state: Optional[dict] = None, rank_state: Optional[dict] = None,
                    tokenizer_dir: Optional[str] = None, extra_files: Optional[dict[str, str]] = None,
                    optimizer_format: str = "dp_reshardable", async_saves=None,
                    on_complete: Optional[Callable[[str], None]] = None) -> str:
    """Collective over all ranks. `train_state`: JSON-able, the same on every rank (iteration counters);
    `rank_state`: this rank's own picklable state (the data loader's position); `extra_files`: name ->
    path, copied in by rank 0 (see CARRIED_FILES). Returns the iteration dir.

    async_saves (an async_save.AsyncSaves): return once the shards are planned and handed to a background
    writer; the checkpoint becomes complete (renamed, `latest` moved) when `async_saves` finalizes it.
    on_complete(iteration dir): called on every rank once the checkpoint is complete.
    """
    from megatron.core import dist_checkpointing

    if optimizer_format not in OPTIMIZER_FORMATS:
        raise CheckpointError(f"optimizer_format {optimizer_format!r}: choose one of {OPTIMIZER_FORMATS}")
    if async_saves is not None:
        async_saves.finish()  # the previous save first: its `.tmp-` directory must not be taken for debris
    rank0 = torch.distributed.get_rank() == 0
    name = iteration_dir_name(iteration)
    final, tmp = os.path.join(save_dir, name), os.path.join(save_dir, f".tmp-{name}")
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
        os.makedirs(tmp)
    torch.distributed.barrier()

    state = _model_state(model_chunks, encoder)
    contents = sorted(state)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, metadata={"distrib_optim_sharding_type": optimizer_format})
        contents.append("optimizer")
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
        contents.append("scheduler")
    state["rng"] = _per_rank_object("rng", _rng_state())
    state["rank_state"] = _per_rank_object("rank_state", rank_state)
    contents += ["rng", "rank_state"]
    if description.padded_vocab_size is None:
        description = dataclasses.replace(description, padded_vocab_size=_unwrap(model_chunks[0]).vocab_size)
    meta = {"format_version": FORMAT_VERSION, "iteration": iteration, "model": description.to_dict(),
            "parallel": _parallel_layout(), "contents": contents, "optimizer_format": optimizer_format,
            "train_state": train_state or {}, "spec": _spec(model_chunks)}

    def finish() -> None:  # once every rank's shards are written
        torch.distributed.barrier()
        if rank0:
            _complete(save_dir, tmp, final, meta, tokenizer_dir, extra_files)
        torch.distributed.barrier()
        if on_complete is not None:
            on_complete(final)

    start_checkpoint_helpers()
    if async_saves is None:
        dist_checkpointing.save(state, tmp)
        finish()
    else:
        request = dist_checkpointing.save(state, tmp, async_sharded_save=True)
        request.add_finalize_fn(finish)
        async_saves.schedule(request, final, discard=lambda: rank0 and shutil.rmtree(tmp, ignore_errors=True))
    return final


def _complete(save_dir: str, tmp: str, final: str, meta: dict, tokenizer_dir: Optional[str],
              extra_files: Optional[dict[str, str]]) -> None:
    """Rank 0, once every shard is written: the small files, the manifest, then the renames."""
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, os.path.join(tmp, "tokenizer"))
    for file_name, source in (extra_files or {}).items():
        shutil.copyfile(source, os.path.join(tmp, file_name))
    with open(os.path.join(tmp, DESCRIPTION), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    files = {os.path.relpath(os.path.join(root, f), tmp): os.path.getsize(os.path.join(root, f))
             for root, _, names in os.walk(tmp) for f in names}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)
    if os.path.exists(final):  # saving the same iteration again (e.g. after a restart)
        shutil.rmtree(final)
    os.rename(tmp, final)
    with open(os.path.join(save_dir, f".{LATEST}.tmp"), "w", encoding="utf-8") as f:
        f.write(os.path.basename(final) + "\n")
    os.replace(os.path.join(save_dir, f".{LATEST}.tmp"), os.path.join(save_dir, LATEST))


# --- load ----------------------------------------------------------------------------------------


def load_checkpoint(load_dir: str, model_chunks: Sequence[torch.nn.Module], *, encoder=None, optimizer=None,
                    scheduler=None, load_rng: bool = True, strict: bool = True) -> dict:
    """Collective. Loads the model (and the encoder, optimizer, scheduler, RNG when given and present).

    Returns {"iteration", "train_state", "rank_state", "loaded": [...], "dir"}. The optimizer and the
    per-rank states are only restored at the parallel layout they were saved with; the model at any.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    iter_dir = resolve(load_dir)  # verified there
    meta = _read_json(os.path.join(iter_dir, DESCRIPTION))
    contents = set(meta["contents"])
    same_layout = meta["parallel"] == _parallel_layout()
    if optimizer is not None and "optimizer" in contents and not same_layout \
            and meta["optimizer_format"] != "fully_reshardable":
        raise CheckpointError(
            f"{iter_dir}: the optimizer state was saved as {meta['optimizer_format']} at {meta['parallel']} "
            f"and cannot be loaded at {_parallel_layout()}; load without it (--no-load-optim) or save with "
            "optimizer_format='fully_reshardable'")
    if encoder is not None and "vision_encoder" not in contents:
        raise CheckpointError(f"{iter_dir}: holds no vision encoder weights")

    state = _model_state(model_chunks, encoder)
    # Checkpoints from before the spec was recorded were all saved with the local spec. (No chunks: only the
    # encoder is loaded, as tools/cache_vision_features.py does, with the local spec.)
    extra_state_missing = meta.get("spec", "local") == "local" and bool(model_chunks) and _spec(model_chunks) == "te"
    if extra_state_missing:
        state, _ = without_extra_state(state)
    loaded = sorted(state)
    if optimizer is not None and "optimizer" in contents:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=True, metadata={"distrib_optim_sharding_type": meta["optimizer_format"]})
        loaded.append("optimizer")
    if same_layout:  # per-rank objects exist for exactly this world
        if load_rng:
            state["rng"] = _per_rank_object("rng", None)
        state["rank_state"] = _per_rank_object("rank_state", None)
    handling = StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.LOG_ALL
    try:
        # Common (non-sharded) items such as the scheduler come back merged into the result.
        restored = dist_checkpointing.load(state, iter_dir, strict=handling)
    except Exception as e:  # name the checkpoint: megatron's errors name only keys
        raise CheckpointError(f"{iter_dir}: could not be loaded into this model: {e}") from e

    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        _load_module(_unwrap(chunk), restored[key], strict, extra_state_missing, f"{iter_dir} {key}")
    if encoder is not None:
        _load_module(encoder, {k.removeprefix("vision_encoder."): v for k, v in restored["vision_encoder"].items()},
                     strict, extra_state_missing, f"{iter_dir} vision_encoder")
    if "optimizer" in loaded:  # (`restored` may hold the optimizer's common part regardless)
        optimizer.load_state_dict(restored["optimizer"])
    if scheduler is not None and "scheduler" in restored:
        scheduler.load_state_dict(restored["scheduler"])
        loaded.append("scheduler")
    if "rng" in restored:
        _set_rng_state(restored["rng"])
        loaded.append("rng")
    return {"iteration": meta["iteration"], "train_state": meta["train_state"], "dir": iter_dir,
            "rank_state": restored.get("rank_state"), "loaded": loaded, "saved_parallel": meta["parallel"]}


def build_model(description: ModelDescription, parallel: ParallelConfig, *, use_cpu_initialization: bool = True,
                params_dtype: torch.dtype = torch.float32, use_te: Optional[bool] = None, **overrides):
    """This rank's model chunks and, on the first pipeline stage, the frozen vision encoder.

    use_te: the Transformer Engine spec (True), the local one (False), or what the machine allows (None).
    """
    from megatron.core import parallel_state

    from himix_megatron.config import build_transformer_config, validate
    from himix_megatron.model import model_class
    from himix_megatron.model.vision import VisionEncoder, build_vision_config, vision_layer_spec
    from himix_megatron.parallel.encoder import encoder_placement
    from himix_megatron.parallel.pipeline import build_model_chunks

    validate(description.language, parallel, description.arch)
    config = build_transformer_config(description.language, description.vision, parallel, arch=description.arch,
                                      params_dtype=params_dtype, use_cpu_initialization=use_cpu_initialization,
                                      padded_vocab_size=description.padded_vocab_size, **overrides)
    chunks = build_model_chunks(model_class(description.arch), config, description.language, use_te=use_te)
    placement = encoder_placement(parallel.encoder_tp)  # collective: on every stage
    encoder = None
    if parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        encoder = VisionEncoder(build_vision_config(description.vision, parallel, params_dtype=params_dtype,
                                                    use_cpu_initialization=use_cpu_initialization),
                                description.vision, spec=vision_layer_spec(use_te), placement=placement)
    # As Megatron-LM's Float16Module does: every parameter in the training dtype, norms included
    # (some are created in fp32); the optimizer keeps the fp32 main copies. On this rank's device: with
    # use_cpu_initialization megatron builds on the CPU, and CLIPViTModel always builds conv1 and its
    # position embeddings there (while its position ids go to the GPU).
    from himix_megatron.platform import device

    for module in chunks + ([encoder] if encoder is not None else []):
        module.to(device=device(), dtype=params_dtype)
    return chunks, encoder
