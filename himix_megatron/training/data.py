"""From the trainer's flags to per-rank micro-batches.

Every rank of a model-parallel group reads the same samples (its data-parallel rank's share), so
tensor-parallel ranks see identical inputs and the last pipeline stage has the labels, without a
broadcast. The image never enters the text for any arch: HiMix reads it by attention, and the
vanilla model puts the connector output in front of the text itself (the LLaVA convention).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from himix_megatron.config import ConfigError, LanguageModelConfig
from himix_megatron.data import DatasetSpec, ImageConfig, LoaderConfig, ShardLoader, TemplateConfig, load_tokenizer
from himix_megatron.parallel.pipeline import MicroBatch
from himix_megatron.training.config import TrainConfig, parse_data_path


def load_tokenizer_checked(path: str, lm: LanguageModelConfig):
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > lm.vocab_size:
        raise ConfigError(f"tokenizer {path} has {tokenizer.vocab_size} tokens, more than the model's "
                          f"vocab_size={lm.vocab_size} ({lm.name})")
    return tokenizer


def _specs(values: list, flag: str) -> tuple[DatasetSpec, ...]:
    return tuple(DatasetSpec.of(d, weight=w) for w, d in parse_data_path(values, flag))


def loader_config(cfg: TrainConfig, template: str, image_size: int, *, valid: bool = False,
                  num_samples: Optional[int] = None) -> LoaderConfig:
    return LoaderConfig(
        datasets=_specs(cfg.valid_data_path if valid else cfg.data_path,
                        "--valid-data-path" if valid else "--data-path"),
        micro_batch_size=cfg.micro_batch_size,
        seq_length=cfg.seq_length,
        template=TemplateConfig(template, image="remove", system=cfg.system_prompt),
        image=ImageConfig(size=image_size),
        seed=cfg.seed,
        shuffle=not valid,
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
        probe = ShardLoader(loader_config(cfg, template, description.vision.image_size), tokenizer,
                            rank=0, world_size=dp)
        samples = int(math.ceil(cfg.train_epochs * probe.epoch_length))
    iters = math.ceil(samples / global_batch_size)
    if iters < 1:
        raise ConfigError(f"{samples} training samples make no step of --global-batch-size {global_batch_size}")
    return iters


def build_train_loader(run) -> ShardLoader:
    rank, world = _data_parallel()
    cfg = run.cfg
    return ShardLoader(loader_config(cfg, run.template, run.description.vision.image_size,
                                     num_samples=run.train_iters * run.global_batch_size),
                       run.tokenizer, rank=rank, world_size=world)


def build_valid_loader(run, paths: list, eval_iters: Optional[int]) -> ShardLoader:
    """One ordered pass over the validation data, in whole global batches (the pipeline needs fixed shapes)."""
    rank, world = _data_parallel()
    cfg = run.cfg
    probe = loader_config(cfg, run.template, run.description.vision.image_size, valid=True)
    length = ShardLoader(probe, run.tokenizer, rank=0, world_size=world).epoch_length
    per_step = cfg.micro_batch_size * world
    samples = (length // per_step) * per_step
    if eval_iters is not None:
        samples = min(samples, eval_iters * run.global_batch_size)
    if samples == 0:
        raise ConfigError(f"--valid-data-path holds {length} samples, fewer than micro batch x DP = {per_step}")
    cfg_valid = loader_config(cfg, run.template, run.description.vision.image_size, valid=True, num_samples=samples)
    return ShardLoader(cfg_valid, run.tokenizer, rank=rank, world_size=world)


def to_microbatch(batch: dict) -> MicroBatch:
    tokens = batch["tokens"]
    b, m = tokens.shape
    has_image = batch["has_image"]
    return MicroBatch(
        tokens=tokens,
        positions=torch.arange(m).expand(b, m),
        labels=batch["labels"].clamp(min=0),  # IGNORE_INDEX positions carry loss_mask 0
        loss_mask=batch["loss_mask"],
        images=batch["images"],
        image_present=None if bool(has_image.all()) else has_image,
        lengths=batch["lengths"],
    )


def microbatch_stream(loader: ShardLoader, count: int, *, finite: bool = False) -> Iterator[list[MicroBatch]]:
    """Lists of `count` micro-batches: one global batch's share for this data-parallel rank.

    Training streams are sized to the run and never end early; a finite (validation) stream ends
    with whatever remains.
    """
    pending = []
    for batch in loader:
        pending.append(to_microbatch(batch))
        if len(pending) == count:
            yield pending
            pending = []
    if not finite:
        raise ConfigError("the data ran out before the last iteration: check --train-iters against the data")
    if pending:
        yield pending
