"""What trains in each stage, and megatron-core's DDP, optimizer and LR schedule around the model.

Stages (DESIGN.md section 2, paper Table 7):
- pretrain: only the vision-side parameters train: RMSNorm_v and W_K,v / W_V,v for HiMix, the
  connector(s) for vanilla and the Fig. 4 variants. The language model is frozen.
- further-pretrain, finetune: the whole language model plus the vision-side parameters.
The vision encoder is frozen in every stage; it is not part of the chunks trained here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from himix_megatron import platform

from himix_megatron.config import ConfigError
from himix_megatron.training.config import TrainConfig

# Parameter-name fragments of the vision side, in every arch: HiMix's RMSNorm_v (local name, or fused
# into linear_kv_vision under TE) and W_K,v / W_V,v; vanilla's and "uniform"'s connector; the
# "hierarchical" variant's per-layer connectors.
VISION_PARAMETERS = ("vision_norm", "linear_kv_vision", "vision_projection", "vision_connector")


def is_vision_parameter(name: str) -> bool:
    return any(part in name for part in VISION_PARAMETERS)


def apply_stage(chunks: Sequence[torch.nn.Module], stage: str) -> int:
    """Freeze what the stage does not train; returns the global trainable parameter count."""
    from megatron.core import parallel_state

    local = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad_(stage != "pretrain" or is_vision_parameter(name))
            if param.requires_grad and _counted_here(param):
                local += param.numel()
    total = torch.tensor([local], dtype=torch.long, device=platform.device())  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    if int(total) == 0:
        raise ConfigError(f"--stage {stage}: no parameter of this model would train")
    return int(total)


def _counted_here(param: torch.nn.Parameter) -> bool:
    """Count each parameter of the model once across its TP/PP ranks."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_rank() != 0:
        return False  # replicated over TP (norms): counted on TP rank 0
    # The tied output layer on the last stage repeats the first stage's embedding.
    return not (getattr(param, "shared_embedding", False) and not parallel_state.is_pipeline_first_stage())


def wrap_ddp(chunks: Sequence[torch.nn.Module], cfg: TrainConfig) -> list[torch.nn.Module]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,  # fp32 main grads under bf16
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        fp8_param_gather=cfg.fp8_param_gather,  # the weights' all-gather in FP8 (config.fp8_param keeps them so)
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        # Only the first chunk of an interleaved pipeline starts its bucket reduction early.
        wrapped.append(DistributedDataParallel(chunk.config, ddp_config, chunk,
                                               disable_bucketing=i > 0))
    return wrapped


def build_optimizer(chunks: Sequence[torch.nn.Module], cfg: TrainConfig, train_iters: int):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam",  # decoupled weight decay (AdamW), as in Megatron-LM
        lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.bf16, params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        fp8_recipe=cfg.fp8_recipe if cfg.fp8_format is not None else None,
    ), list(chunks))
    warmup = int(round(cfg.lr_warmup_fraction * train_iters))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=train_iters, lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
    return optimizer, scheduler
