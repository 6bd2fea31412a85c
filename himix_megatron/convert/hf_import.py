"""Hugging Face Llama/Qwen2 decoder + SigLIP or CLIP vision tower -> a megatron checkpoint at any TP/PP.

The import really runs at the requested layout: TP x PP gloo ranks are spawned, each builds its own
shard of the model with `checkpoint.build_model`, fills it from the HF files (each rank reads only the
tensors of its own stage, memory-mapped), and `checkpoint.save_checkpoint` writes the checkpoint
collectively. Everything that can be checked without the model is checked first, in this process:
the configs, the parallel layout, and the presence and shape of every HF tensor, so a bad input fails
fast with the tensor or field named, and before any rank starts.

Parameters HF does not have are new and reported: HiMix's RMSNorm_v (ones) and vision K/V
(normal, std = init_method_std, bias zero), and the connectors of the vanilla / uniform / hierarchical
models (weights normal(std), biases zero). They are seeded by name, so the same import at another TP/PP
gives the same values.

The vision tower is a SiglipVisionModel or CLIPVisionModel directory, or a SiglipModel or CLIPModel one (its
vision tower is read; `layout.vision_from_hf` maps the config, `model/vision.py` the weights). The tower's
tensors the encoder does not hold (its last layer, post_layernorm and SigLIP's head: HiMix reads the
penultimate layer) are kept next to the checkpoint in `hf_vision_extra.safetensors`, so an export can
write the complete tower again.

The output directory appears only when complete: everything is written to `<output>.tmp-<pid>` and
renamed at the end; a failure removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from himix_megatron.checkpoint import CARRIED_FILES, ModelDescription
from himix_megatron.config import ARCHS, ConfigError, ParallelConfig, validate
from himix_megatron.convert import layout
from himix_megatron.convert.hf_files import HFTensors, check_tensors, read_config, stage_tokenizer
from himix_megatron.convert.layout import ConversionError
from himix_megatron.platform import free_port

VISION_EXTRA = CARRIED_FILES[0]  # hf_vision_extra.safetensors


@dataclass(frozen=True)
class ImportPlan:
    """Everything a rank needs (picklable): where the HF files are and what to build."""

    hf_llm: str
    hf_vision: str
    description: ModelDescription
    parallel: ParallelConfig
    seed: int = 0
    init_method_std: float = 0.02


def plan_import(hf_llm: str, hf_vision: str, arch: str, parallel: ParallelConfig,
                template: Optional[str] = None, seed: int = 0) -> ImportPlan:
    """Read and check both HF directories against `arch` and `parallel`; raises naming what is wrong."""
    from himix_megatron.model.vision import _vision_prefix, build_vision_config

    if arch not in ARCHS:
        raise ConfigError(f"arch={arch!r} is not one of {list(ARCHS)}")
    template, system = recorded_prompt(template, "--template")
    lm = layout.language_from_hf(read_config(hf_llm), _name(hf_llm), os.path.join(hf_llm, "config.json"))
    vision = layout.vision_from_hf(read_config(hf_vision), _name(hf_vision), os.path.join(hf_vision, "config.json"))
    validate(lm, parallel, arch)
    if arch == "uniform" and parallel.pipeline_model_parallel_size > 1:
        raise ConfigError("arch 'uniform' shares one connector across all layers and does not support "
                          "pipeline_model_parallel_size > 1")
    build_vision_config(vision, parallel)  # TP must divide the vision heads and FFN too
    check_tensors(HFTensors(hf_llm), layout.lm_hf_shapes(lm), "language model")
    vision_tensors = HFTensors(hf_vision)
    prefix = _vision_prefix(vision_tensors, layout.TOWER_NAMES[vision.kind])
    check_tensors(vision_tensors, {prefix + k: s for k, s in layout.vision_hf_shapes(vision).items()}, "vision")
    return ImportPlan(hf_llm, hf_vision, ModelDescription(arch, lm, vision, template, system_prompt=system),
                      parallel, seed)


def recorded_prompt(template: Optional[str], where: str) -> tuple[Optional[str], Optional[str]]:
    """(template, system prompt) an imported checkpoint records: the template's default prompt, which training
    keeps unless it states another."""
    from himix_megatron.data.records import DataError
    from himix_megatron.data.templates import TemplateConfig

    if template is None:
        return None, None
    try:
        return template, TemplateConfig(template).system_prompt
    except DataError as e:
        raise ConfigError(f"{where}: {e}") from None


def _name(directory: str) -> str:
    return "hf:" + os.path.basename(os.path.normpath(directory))


def _global_name(name: str, chunk: torch.nn.Module) -> str:
    """Chunk-local parameter name -> the name at PP=1 (decoder layers numbered from the first stage)."""
    parts = name.split(".", 3)
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def fill_from_hf(model_chunks: Sequence[torch.nn.Module], encoder, description: ModelDescription,
                 lm_tensors: Mapping[str, torch.Tensor], vision_tensors: Optional[Mapping[str, torch.Tensor]],
                 *, seed: int = 0, init_method_std: float = 0.02) -> tuple[list[str], list[str]]:
    """Copy HF weights into this rank's chunks (and encoder); initialise the parameters HF lacks.

    Returns (new parameter names at PP=1, unused HF vision tensor names). Works on any rank of any TP/PP.
    """
    from megatron.core import parallel_state

    from himix_megatron.model.vision import load_hf_vision_state_dict

    lm = description.language
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()

    def get(key: str) -> torch.Tensor:
        if key not in lm_tensors:
            raise ConversionError(f"missing language model tensor {key!r}")
        return lm_tensors[key]

    new = []
    with torch.no_grad():
        for chunk in model_chunks:
            chunk = getattr(chunk, "module", chunk)
            if size > 1 and not hasattr(chunk.decoder.layers[0].self_attention.linear_qkv.weight, "partition_dim"):
                raise ConversionError("the model was built with perform_initialization=False, so megatron did not "
                                      "mark its tensor-parallel parameters; build it with initialisation")
            for name, param in chunk.named_parameters():
                gname = _global_name(name, chunk)
                shape = layout.full_shape(param, size)
                full = layout.megatron_lm_tensor(gname, lm, get, padded_vocab=shape[0])
                if full is None:
                    full = layout.init_new_parameter(gname, shape, init_method_std, seed)
                    new.append(gname)
                if tuple(full.shape) != shape:
                    raise ConversionError(f"megatron parameter {gname!r}: Hugging Face gives shape "
                                          f"{tuple(full.shape)}, the model has {shape}")
                param.copy_(layout.shard(gname, full, param, rank, size))
    unused = []
    if encoder is not None:
        if vision_tensors is None:
            raise ConversionError("this rank holds the vision encoder but no vision tensors were given")
        unused = load_hf_vision_state_dict(encoder, vision_tensors)
    return new, unused


def rank_environment(rank: int, world: int, port: int) -> None:
    """An import rank's torch.distributed environment (one of `world` spawned gloo processes on this node)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def save_imported(rank: int, chunks, encoder, description, vision, unused: list, tmp: str, staging: str,
                  report: dict) -> None:
    """Every import rank's last step: its shard of the iteration-0 checkpoint (rank 0 adds the tokenizer and
    the vision tower tensors the encoder leaves out), and its report for the parent process."""
    from himix_megatron.checkpoint import save_checkpoint

    tokenizer = os.path.join(staging, "tokenizer")
    extra = {}
    if rank == 0:  # first stage: it holds the encoder, so it knows which tower tensors were left out
        extra[VISION_EXTRA] = os.path.join(staging, VISION_EXTRA)
        _save_vision_extra(vision, unused, extra[VISION_EXTRA])
    save_checkpoint(tmp, chunks, description, iteration=0, encoder=encoder,
                    tokenizer_dir=tokenizer if os.listdir(tokenizer) else None, extra_files=extra)
    with open(os.path.join(staging, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)


def _import_rank(rank: int, world: int, port: int, plan: ImportPlan, tmp: str, staging: str) -> None:
    rank_environment(rank, world, port)
    from himix_megatron import platform
    from himix_megatron.checkpoint import build_model

    platform.initialize(plan.parallel, use_gpu=False)  # a format conversion: CPU, gloo, local spec on any node
    try:
        # Not perform_initialization=False, although every parameter is overwritten: megatron sets the
        # tensor-parallel attributes (partition_dim) that `layout.shard` reads only when it initialises.
        chunks, encoder = build_model(plan.description, plan.parallel)
        vision = HFTensors(plan.hf_vision) if encoder is not None else None
        new, unused = fill_from_hf(chunks, encoder, plan.description, HFTensors(plan.hf_llm), vision,
                                   seed=plan.seed, init_method_std=plan.init_method_std)
        save_imported(rank, chunks, encoder, plan.description, vision, unused, tmp, staging,
                      {"new": new, "unused_vision": unused})
    finally:
        platform.shutdown()


def _save_vision_extra(vision: Mapping[str, torch.Tensor], unused: list[str], path: str) -> None:
    from safetensors.torch import save_file

    from himix_megatron.model.vision import _vision_prefix

    prefix = _vision_prefix(vision)
    save_file({k[len(prefix):]: vision[k].contiguous() for k in unused}, path, metadata={"format": "pt"})


@dataclass
class ImportReport:
    output: str
    description: ModelDescription
    new_parameters: list[str]
    unused_vision_tensors: list[str]
    tokenizer_files: list[str]


def import_checkpoint(hf_llm: str, hf_vision: str, arch: str, parallel: ParallelConfig, output: str, *,
                      template: Optional[str] = None, seed: int = 0,
                      log: Callable[[str], None] = print) -> ImportReport:
    """Convert, at `parallel`'s TP x PP (that many processes), into the checkpoint directory `output`."""
    output = os.path.normpath(output)
    if os.path.exists(output):
        raise ConversionError(f"--output {output} already exists; refusing to overwrite it")
    plan = plan_import(hf_llm, hf_vision, arch, parallel, template, seed)

    def tokenizer(target: str) -> list[str]:
        files = stage_tokenizer(hf_llm, target, read_config(hf_llm))
        if not files:
            log(f"warning: no tokenizer files in {hf_llm}; the checkpoint will have none")
        return files

    results, tokenizer_files = spawn_import(_import_rank, plan, parallel, output, tokenizer)
    new = sorted({n for r in results for n in r["new"]}, key=_layer_order)
    report = ImportReport(output, plan.description, new, results[0]["unused_vision"], tokenizer_files)
    _log_report(report, parallel, log)
    return report


def spawn_import(rank_fn, plan, parallel: ParallelConfig, output: str,
                 stage_tokenizer_to: Callable[[str], list[str]]) -> tuple[list[dict], list[str]]:
    """Run `rank_fn(rank, world, port, plan, tmp, staging)` on TP x PP spawned gloo processes, each writing its
    shard (save_imported); `output` appears only when all have. `stage_tokenizer_to(dir)` first copies the
    tokenizer files there and returns their names. Returns (every rank's report, the tokenizer files)."""
    import torch.multiprocessing as mp

    world = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    tmp = f"{output}.tmp-{os.getpid()}"
    staging = tempfile.mkdtemp(prefix="himix-import-")
    try:
        tokenizer_files = stage_tokenizer_to(os.path.join(staging, "tokenizer"))
        os.makedirs(tmp)
        try:
            mp.start_processes(rank_fn, args=(world, free_port(), plan, tmp, staging), nprocs=world,
                               join=True, start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            # A rank raised (the traceback's last line names the error) or was killed.
            raise ConversionError(f"import failed on a rank: {str(e).strip().splitlines()[-1]}") from e
        results = [_read_json(os.path.join(staging, f"rank{r}.json")) for r in range(world)]
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results, tokenizer_files


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _layer_order(name: str):
    parts = name.split(".")
    return (0, int(parts[2]), name) if parts[:2] == ["decoder", "layers"] else (1, 0, name)


def _log_report(r: ImportReport, parallel: ParallelConfig, log: Callable[[str], None]) -> None:
    d = r.description
    log(f"imported {d.language.name} + {d.vision.name} as arch={d.arch} at TP={parallel.tensor_model_parallel_size} "
        f"PP={parallel.pipeline_model_parallel_size} -> {r.output}")
    log(f"new parameters (not in the Hugging Face checkpoints), {len(r.new_parameters)}:")
    for name in r.new_parameters:
        log(f"  {name}")
    log(f"{layout.TOWER_NAMES[d.vision.kind]} tensors the encoder does not use (kept in {VISION_EXTRA}), "
        f"{len(r.unused_vision_tensors)}")
    log(f"tokenizer files: {', '.join(r.tokenizer_files) or 'none'}")
