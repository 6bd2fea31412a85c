"""From the trainer's flags to per-rank micro-batches.

Every rank of a model-parallel group reads the same samples (its data-parallel rank's share), so
tensor-parallel ranks see identical inputs and the last pipeline stage has the labels, without a
broadcast. HiMix's text holds no image (it reads the image by attention); vanilla LLaVA's holds one image id
where the authors' template puts it (`image="mark"`), which the model replaces by the connector output.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator, Optional

import torch

from himix_megatron import platform
from himix_megatron.config import ConfigError, LanguageModelConfig, VisionModelConfig
from himix_megatron.data import DatasetSpec, LoaderConfig, ShardLoader, TemplateConfig, load_tokenizer
from himix_megatron.data.image import image_config_for
from himix_megatron.data.features import FeatureStore, expected_description
from himix_megatron.data.balance import BalanceConfig, SampleCost
from himix_megatron.data.packing import ROW_MULTIPLE, PackingConfig, extend_segments
from himix_megatron.parallel.pipeline import MicroBatch
from himix_megatron.training.config import TrainConfig, packing_max_images, parse_data_path


def load_tokenizer_checked(path: str, lm: LanguageModelConfig):
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > lm.vocab_size:
        raise ConfigError(f"tokenizer {path} has {tokenizer.vocab_size} tokens, more than the model's "
                          f"vocab_size={lm.vocab_size} ({lm.name})")
    return tokenizer


def _specs(values: list, flag: str) -> tuple[DatasetSpec, ...]:
    return tuple(DatasetSpec.of(d, weight=w) for w, d in parse_data_path(values, flag))


def loader_config(cfg: TrainConfig, template: str, vision: VisionModelConfig, *, valid: bool = False,
                  num_samples: Optional[int] = None, packing: Optional[PackingConfig] = None,
                  group: Optional[int] = None, arch: Optional[str] = None) -> LoaderConfig:
    """Images are preprocessed for encoder `vision` (`image_config_for`). With `packing`, each loader item is one
    step's rows, packed from `group` samples (global batch / DP). `arch` (default --arch; the checkpoint's with
    --load) chooses the image's place in the text (`TemplateConfig.for_arch`)."""
    return LoaderConfig(
        datasets=_specs(cfg.valid_data_path if valid else cfg.data_path,
                        "--valid-data-path" if valid else "--data-path"),
        micro_batch_size=group if packing is not None else cfg.micro_batch_size,
        seq_length=cfg.seq_length,
        pad_to="seq_length" if cfg.pad_to_seq_length else "longest",
        pad_multiple=row_multiple(cfg),
        packing=packing,
        template=TemplateConfig.for_arch(template, arch or cfg.arch, system=cfg.system_prompt),
        image=image_config_for(vision, cfg.image_aspect_ratio),
        seed=cfg.seed,
        shuffle=not valid,
        drop_last=not valid,  # validation reads every sample: a packed last group may be short
        num_workers=cfg.num_workers,
        num_samples=num_samples,
    )


def _data_parallel() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def train_iters(cfg: TrainConfig, global_batch_size: int, dp: int, tokenizer, template: str, description) -> int:
    if cfg.train_iters is not None:
        return cfg.train_iters
    samples = cfg.train_samples
    if samples is None:  # --train-epochs: the length of one pass over the blend
        probe = ShardLoader(loader_config(cfg, template, description.vision, arch=description.arch), tokenizer,
                            rank=0, world_size=dp)
        samples = int(math.ceil(cfg.train_epochs * probe.epoch_length))
    iters = math.ceil(samples / global_batch_size)
    if iters < 1:
        raise ConfigError(f"{samples} training samples make no step of --global-batch-size {global_batch_size}")
    return iters


def row_multiple(cfg: TrainConfig) -> int:
    """Micro-batch widths round up to this: 8 (few distinct shapes), or under FP8 what the recipe's GEMMs need
    (16, 32 for mxfp8: training/fp8.py); sequence parallelism splits the rows over TP ranks, and each rank's
    share must be such a multiple too."""
    from himix_megatron.training.fp8 import row_align

    multiple = max(ROW_MULTIPLE, row_align(cfg.fp8_recipe, cfg.sequence_parallel)) if cfg.fp8_format is not None \
        else ROW_MULTIPLE
    return multiple * (cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1)


def packing_config(cfg: TrainConfig, vision_tokens: int) -> Optional[PackingConfig]:
    if cfg.packing_seq_length is None:
        return None
    return PackingConfig(cfg.packing_seq_length, cfg.packing_buffer_size, packing_max_images(cfg), vision_tokens,
                         row_multiple(cfg), even_rows=cfg.pipeline_model_parallel_size > 1)


def balance_config(cfg: TrainConfig, description, global_batch_size: int) -> BalanceConfig:
    """Packed training's data-parallel plan: each sample costs its training FLOPs (flops.py) for this run's
    model and stage, plus the frozen encoder's forward per image unless the run reads cached features."""
    from himix_megatron.flops import vision_encoder_cost

    vision = description.vision
    encoder = 0 if cfg.vision_features is not None else vision_encoder_cost(vision).feature_flops
    cost = SampleCost(description.language, description.arch, vision.num_features, vision.hidden_size, cfg.stage,
                      encoder_flops=encoder)
    return BalanceConfig(global_batch_size, cost, "round-robin" if cfg.no_data_parallel_balance else "balanced")


def vision_feature_store(cfg: TrainConfig, vision, encoder) -> Optional[FeatureStore]:
    """--vision-features: the cached features of every --data-path directory, checked against this run's
    encoder (on the first pipeline stage, which holds it) and preprocessing."""
    if cfg.vision_features is None:
        return None
    dirs = [d for spec in _specs(cfg.data_path, "--data-path") for d in spec.paths]
    expected = expected_description(vision, image_config_for(vision, cfg.image_aspect_ratio), encoder=encoder)
    return FeatureStore(cfg.vision_features, dirs, expected)


def build_train_loader(run) -> ShardLoader:
    rank, world = _data_parallel()
    cfg = run.cfg
    packing = packing_config(cfg, run.description.vision.num_features)
    loader_cfg = loader_config(cfg, run.template, run.description.vision,
                               num_samples=run.train_iters * run.global_batch_size, packing=packing,
                               group=run.global_batch_size // world, arch=run.description.arch)
    features = vision_feature_store(cfg, run.description.vision, run.encoder)
    if features is not None:
        loader_cfg = replace(loader_cfg, vision_features=features)
    if packing is not None:
        loader_cfg = replace(loader_cfg, balance=balance_config(cfg, run.description, run.global_batch_size))
    elif not cfg.pad_to_seq_length and cfg.pipeline_model_parallel_size == 1:
        # Dynamic padding: a step's samples regrouped by length (pipeline parallelism pads a step to its longest
        # micro-batch anyway). Unpacked steps are not balanced across ranks: see data/balance.py.
        loader_cfg = replace(loader_cfg, length_groups=run.num_microbatches)
    return ShardLoader(loader_cfg, run.tokenizer, rank=rank, world_size=world)


def cached_features_encoder(cfg: TrainConfig):
    """What takes the encoder's place with --vision-features: the loader's [b, N, d_v] -> [N, b, d_v], in the
    dtype the encoder would have produced (the run's parameter dtype)."""
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    return lambda features: features.transpose(0, 1).to(dtype).contiguous()


def build_valid_loader(run, paths: list, eval_iters: Optional[int]) -> ShardLoader:
    """One ordered pass over the validation data, in whole global batches (the pipeline needs fixed shapes)."""
    rank, world = _data_parallel()
    cfg = run.cfg
    probe = loader_config(cfg, run.template, run.description.vision, valid=True, arch=run.description.arch)
    length = ShardLoader(probe, run.tokenizer, rank=0, world_size=world).epoch_length
    per_step = cfg.micro_batch_size * world
    samples = (length // per_step) * per_step
    if eval_iters is not None:
        samples = min(samples, eval_iters * run.global_batch_size)
    if samples == 0:
        raise ConfigError(f"--valid-data-path holds {length} samples, fewer than micro batch x DP = {per_step}")
    packing = packing_config(cfg, run.description.vision.num_features)
    cfg_valid = loader_config(cfg, run.template, run.description.vision, valid=True, num_samples=samples,
                              packing=packing, group=run.global_batch_size // world, arch=run.description.arch)
    return ShardLoader(cfg_valid, run.tokenizer, rank=rank, world_size=world)


def step_stream(run, loader: ShardLoader, *, finite: bool = False) -> Iterator[list[MicroBatch]]:
    """The run's steps: micro-batch lists as forward_backward takes them, padded for the pipeline if needed."""
    from megatron.core import parallel_state

    pipeline_pad = None
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        image_tokens = run.description.vision.num_features if run.description.arch == "vanilla" else 0
        pipeline_pad = (run.tokenizer.pad_id, image_tokens)
    count = None if run.cfg.packing_seq_length is not None else run.num_microbatches
    return microbatch_stream(loader, count, finite=finite, pipeline_pad=pipeline_pad, device=platform.device())


def to_microbatch(batch: dict) -> MicroBatch:
    tokens = batch["tokens"]
    b, m = tokens.shape
    segments = batch.get("segments")
    has_image = batch["has_image"]
    return MicroBatch(
        tokens=tokens,
        positions=segments.text_positions[None] if segments is not None else torch.arange(m).expand(b, m),
        labels=batch["labels"].clamp(min=0),  # IGNORE_INDEX positions carry loss_mask 0
        loss_mask=batch["loss_mask"],
        images=batch["images"],
        image_present=None if segments is not None or bool(has_image.all()) else has_image,
        lengths=batch["lengths"],
        segments=segments,
    )


def one_decoder_length(microbatches: list[MicroBatch], pad_id: int, image_tokens: int) -> list[MicroBatch]:
    """Pad a step's micro-batches to one decoder length, which pipeline stages exchange.

    Every stage reads the same samples, so each pads the same way with no shape exchange (megatron-core's
    variable_seq_lengths would send shapes over untagged batched p2p, which gloo can swap under
    interleaving). `image_tokens`: positions an image adds to the sequence (vanilla's N; 0 for HiMix).
    """
    def length(mb):
        images = mb.segments.num_images if mb.segments is not None else 1
        return mb.tokens.shape[1] + image_tokens * images

    width = max(length(mb) for mb in microbatches)
    out = []
    for mb in microbatches:
        extra = width - length(mb)
        if extra == 0:
            out.append(mb)
            continue
        grow = lambda t, fill: torch.cat([t, torch.full((t.shape[0], extra), fill, dtype=t.dtype)], 1)  # noqa: E731
        segments = positions = None
        if mb.segments is not None:
            segments = extend_segments(mb.segments, extra)
            positions = segments.text_positions[None]
        else:
            positions = torch.arange(mb.tokens.shape[1] + extra).expand(mb.tokens.shape[0], -1)
        out.append(replace(mb, tokens=grow(mb.tokens, pad_id), labels=grow(mb.labels, 0),
                           loss_mask=grow(mb.loss_mask, 0.0), positions=positions, segments=segments))
    return out


def microbatch_stream(loader: ShardLoader, count: Optional[int], *, finite: bool = False,
                      pipeline_pad: Optional[tuple[int, int]] = None, device=None) -> Iterator[list[MicroBatch]]:
    """Lists of micro-batches: one global batch's share for this data-parallel rank.

    Unpacked: `count` micro-batches of the loader. Packed (count None): each loader item is already one
    step's packed rows, however many. `pipeline_pad` = (pad_id, image tokens) pads each step to one decoder
    length (pipeline parallelism); `device` moves every micro-batch there. Training streams are sized to the
    run and never end early; a finite
    (validation) stream ends with whatever remains.
    """
    def finish(batches):
        step = [to_microbatch(b) for b in batches]
        step = one_decoder_length(step, *pipeline_pad) if pipeline_pad is not None else step
        return [mb.to(device) for mb in step] if device is not None else step

    pending = []
    for item in loader:
        if count is None:  # packed: one item is one step
            yield finish(item)
            continue
        pending.append(item)
        if len(pending) == count:
            yield finish(pending)
            pending = []
    if not finite:
        raise ConfigError("the data ran out before the last iteration: check --train-iters against the data")
    if pending:
        yield finish(pending)
