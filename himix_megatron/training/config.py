"""The trainer's configuration: one typed dataclass, Megatron-LM flag names, an optional YAML file.

Every field is a flag: `tensor_model_parallel_size` is `--tensor-model-parallel-size`. A YAML file
(`--config FILE`) may hold the same keys, with either spelling; flags given on the command line
override it. `check()` refuses contradictory or impossible settings before anything is built, naming
the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Optional

from himix_megatron.config import ARCHS, ConfigError
from himix_megatron.training.fp8 import FP8_FORMATS, FP8_RECIPES, check_fp8_flags, row_align

STAGES = ("pretrain", "further-pretrain", "finetune")


@dataclass
class TrainConfig:
    # --- model (ignored when --load names a checkpoint, which describes its own model)
    arch: str = field(default="himix", metadata={"choices": ARCHS, "help": "ignored with --load (and below)"})
    model: str = field(default="tiny", metadata={"help": "language model preset (himix_megatron.config)"})
    vision_model: str = field(default="tiny", metadata={"help": "vision encoder preset; without --load only "
                                                                  "the random tiny ones"})
    stage: str = field(default="finetune", metadata={"choices": STAGES,
                       "help": "pretrain trains the vision parameters only; the others the LM too"})
    # --- gamma-MoD (--arch vanilla, finetune stage; himix_megatron/model/gamma_mod.py). With --load of a
    # gamma-MoD checkpoint its settings apply without --gamma-mod; the flags below override them.
    gamma_mod: bool = field(default=False, metadata={
        "help": "gamma-MoD: mixture-of-depth layers with a shared router (vanilla arch, not in pretrain)"})
    mod_layers: Optional[str] = field(default=None, metadata={
        "help": "gamma-MoD: comma-separated 0-based MoD layers, e.g. 3,4,5 (default: every layer but the first "
                "three and the last; tools/arank.py ranks them)"})
    mod_capacity: Optional[float] = field(default=None, metadata={
        "help": "gamma-MoD: fraction of a sample's image and system-prompt tokens each MoD layer processes in "
                "training (default 0.5)"})
    mod_aux_loss_coeff: Optional[float] = field(default=None, metadata={
        "help": "gamma-MoD: weight of the router's auxiliary loss (default 0.01)"})
    mod_threshold: Optional[float] = field(default=None, metadata={
        "help": "gamma-MoD: in evaluation a token is processed iff its router probability exceeds this "
                "(default 0.005)"})
    mod_router_bias: bool = field(default=False, metadata={
        "help": "gamma-MoD: give the router a bias (the official router has none)"})
    mod_skip: Optional[str] = field(default=None, metadata={"choices": ("layer", "mlp"),
        "help": "gamma-MoD: what a skipped token skips: the whole layer (default, the official code) or only the MLP "
                "(attention runs for every token)"})
    # --- parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    encoder_tensor_model_parallel_size: Optional[int] = field(default=None, metadata={
        "help": "the frozen vision encoder's tensor-parallel size E, dividing --tensor-model-parallel-size T: "
                "T / E copies of it per TP group, each sharded over E ranks and encoding 1/(T/E) of a micro-batch's "
                "images, then one all-gather of the features (default: replicated, 1, when the images split evenly "
                "enough over the T ranks, else T; measured in docs/parallelism.md, 'Tensor parallelism: where the "
                "encoder runs')"})
    # --- batch
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = field(default=None, metadata={"help": "default: micro batch x DP"})
    seq_length: int = field(default=2048, metadata={
        "help": "tokens a sample keeps, the image placeholder counted as one token, as the authors' "
                "--model_max_length counts it (the decoder then sees at most seq-length - 1 text positions of it)"})
    # --- packing (Megatron-LM's multimodal flag names); without it, micro-batches are padded to their longest
    packing_seq_length: Optional[int] = field(default=None, metadata={
        "help": "pack samples into rows of this many text tokens, each sample with its own image; needs "
                "--micro-batch-size 1 (a micro-batch is one row). --global-batch-size, --train-samples and "
                "--train-epochs still count samples, so a step holds a varying number of rows"})
    packing_buffer_size: Optional[int] = field(default=None, metadata={
        "help": "samples considered at once when packing (default: a step's share of a data-parallel rank, "
                "global batch / DP, which is also the most it can be)"})
    packing_max_images: Optional[int] = field(default=None, metadata={
        "help": "images per packed row (default: --packing-seq-length // 128, at least 1): each image costs "
                "its vision K/V in every layer, and short captions would otherwise fill a row with dozens"})
    pad_to_seq_length: bool = field(default=False, metadata={
        "help": "pad every sample to --seq-length (fixed shapes) instead of each micro-batch to its longest"})
    no_data_parallel_balance: bool = field(default=False, metadata={
        "help": "with --packing-seq-length: split each global batch over the data-parallel ranks round-robin "
                "instead of by each sample's training FLOPs (himix_megatron/data/balance.py), for comparison"})
    # --- schedule and optimizer (AdamW)
    train_iters: Optional[int] = None
    train_samples: Optional[int] = None
    train_epochs: Optional[float] = field(default=None, metadata={"help": "passes over the data; sets train_samples"})
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = field(default="cosine", metadata={"choices": ("cosine", "linear", "constant")})
    lr_warmup_fraction: float = 0.03
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    # --- precision and memory
    bf16: bool = False
    fp8_format: Optional[str] = field(default=None, metadata={"choices": FP8_FORMATS})
    fp8_recipe: str = field(default="delayed", metadata={"choices": FP8_RECIPES, "help": (
        "with --fp8-format: megatron-core's scaling recipe; tensorwise (current scaling) and delayed need compute "
        "capability 8.9+, blockwise 9.0+ and CUDA 12.9, mxfp8 a Blackwell (10.x) GPU (training/fp8.py)")})
    fp8_param_gather: bool = field(default=False, metadata={
        "help": "keep the decoder's weights in FP8 and all-gather them in FP8 (needs --use-distributed-optimizer)"})
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = field(default="max", metadata={"choices": ("max", "most_recent")})
    recompute_granularity: Optional[str] = field(default=None, metadata={"choices": ("full", "selective")})
    recompute_method: str = field(default="uniform", metadata={"choices": ("uniform", "block")})
    recompute_num_layers: int = 1
    seed: int = 1234
    # --- data
    data_path: list = field(default_factory=list, metadata={
        "help": "shard directories, optionally weighted Megatron-style: 0.7 DIR_A 0.3 DIR_B"})
    valid_data_path: list = field(default_factory=list)
    tokenizer_model: Optional[str] = field(default=None, metadata={
        "help": "tokenizer.model, tokenizer.json or a directory with one (default: the checkpoint's)"})
    template: Optional[str] = field(default=None, metadata={
        "help": "conversation template: pretrain, tinyllama (Vicuna, TinyLlama), llama-3 (Llama-3.2), qwen2_base "
                "(Qwen2), as the HiMix authors name them; or llama3_instruct / chatml to keep an instruct model's "
                "own format (default: the checkpoint's, else the paper's template for the tokenizer)"})
    system_prompt: Optional[str] = field(default=None, metadata={
        "help": "the system prompt ('' for none; default: the checkpoint's if it used this template, else the "
                "template's, the authors' 'A chat between a curious user ...'); recorded in every checkpoint"})
    num_workers: int = 2
    image_aspect_ratio: str = field(default="resize", metadata={"choices": ("resize", "pad"), "help":
        "pad: centre each image on a square filled with the encoder's mean colour before resizing (LLaVA-1.5's "
        "--image_aspect_ratio pad, the reference HiMix finetuning's); resize: the encoder's own processor"})
    vision_features: Optional[str] = field(default=None, metadata={
        "help": "read the vision encoder's cached features NAME (tools/cache_vision_features.py, stored in "
                "each --data-path directory under features/NAME) instead of encoding the training images"})
    # --- checkpointing
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    save_retain_interval: Optional[int] = field(default=None, metadata={
        "help": "keep only the checkpoints at multiples of this many iterations, plus the newest (and "
                "--save-keep-last); a multiple of --save-interval"})
    save_keep_last: Optional[int] = field(default=None, metadata={"help": "keep the newest K checkpoints"})
    async_save: bool = field(default=False, metadata={
        "help": "write checkpoint shards in a background process while training continues; the checkpoint "
                "becomes the latest once every rank's write has finished"})
    # --- stopping early (Megatron-LM's names): finish the step, agree across ranks, save, exit 0
    exit_signal_handler: bool = field(default=False, metadata={
        "help": "on --exit-signal (preemption, scancel, SLURM's --signal warning) finish the current step, "
                "save and exit 0"})
    exit_signal: str = field(default="SIGTERM", metadata={"help": "the signal --exit-signal-handler catches"})
    exit_duration_in_mins: Optional[float] = field(default=None, metadata={
        "help": "stop, save and exit 0 once the run has trained this long (wall clock)"})
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = field(default=False, metadata={
        "help": "load model weights only and start at iteration 0 (implied when the stage changes)"})
    ckpt_optimizer_format: str = field(default="dp_reshardable", metadata={
        "choices": ("dp_reshardable", "fully_reshardable")})
    # --- logging and evaluation
    log_interval: int = 1
    eval_interval: Optional[int] = None
    eval_iters: Optional[int] = field(default=None, metadata={"help": "default: the whole validation set"})
    tensorboard_dir: Optional[str] = None
    log_timers_to_tensorboard: bool = field(default=False, metadata={
        "help": "add megatron-core's timers (NAME-time: seconds per iteration, the slowest rank's) to TensorBoard "
                "and W&B"})
    timing_log_level: int = field(default=0, metadata={
        "choices": (0, 1, 2), "help": "which timers run: 0 the iteration and the save, 1 also forward-backward, "
                                      "gradient sync and the optimizer's parts, 2 also compute, p2p and data"})
    log_memory_to_tensorboard: bool = field(default=False, metadata={
        "help": "add memory (mem-*-bytes: CUDA allocator, or resident set on CPU; the largest rank's) to "
                "TensorBoard and W&B"})
    # Weights & Biases (training/wandb_run.py; the optional extra `wandb`)
    wandb_project: Optional[str] = field(default=None, metadata={"help": "log to this W&B project (from the last "
                                                                         "rank, like TensorBoard)"})
    wandb_exp_name: Optional[str] = field(default=None, metadata={"help": "the W&B run's name"})
    wandb_save_dir: Optional[str] = field(default=None, metadata={"help": "W&B's local files (default: --save/wandb)"})
    wandb_entity: Optional[str] = field(default=None, metadata={"help": "the W&B team or user"})
    max_bad_steps: int = field(default=5, metadata={
        "help": "consecutive NaN/Inf steps (skipped) before saving and aborting"})
    peak_flops: Optional[float] = field(default=None, metadata={
        "help": "per-device peak FLOP/s for MFU (default: known GPUs only)"})
    exit_interval: Optional[int] = field(default=None, metadata={"help": "stop after this iteration (tests)"})
    progress: bool = field(default=True, metadata={"help": "rank-0 progress bar"})
    inject_nan_at: list = field(default_factory=list, metadata={
        "item_type": int, "help": "testing aid: make the loss and gradients NaN at these iterations"})
    inject_signal_at: Optional[int] = field(default=None, metadata={
        "help": "testing aid: rank 0 sends itself --exit-signal after this iteration's step"})

    @property
    def data_parallel_size(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="himix-train", description="Train a HiMix (or vanilla LLaVA) model.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML file with the same keys; flags override it")
    for f in dataclasses.fields(TrainConfig):
        kw = {"help": f.metadata.get("help", " ")}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.type == "bool":
            p.add_argument(_flag(f.name), action="store_true", **kw)
            if f.default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false")
        elif f.type == "list":
            p.add_argument(_flag(f.name), nargs="+", type=f.metadata.get("item_type", str), **kw)
        else:
            kw["type"] = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
                          "Optional[str]": str}[f.type]
            p.add_argument(_flag(f.name), **kw)
    return p


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        out[name] = value
    return out


def parse_args(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values = load_yaml(args.pop("config")) if "config" in args else {}
    values.update(args)
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"bad configuration: {e}") from None
    if isinstance(cfg.data_path, str):
        cfg.data_path = cfg.data_path.split()
    if isinstance(cfg.valid_data_path, str):
        cfg.valid_data_path = cfg.valid_data_path.split()
    return cfg


def parse_data_path(values: list, flag: str = "--data-path") -> list[tuple[Optional[float], str]]:
    """`DIR [DIR ...]` or Megatron's weighted `W DIR [W DIR ...]`."""
    values = [str(v) for v in values]

    def number(s):
        try:
            return float(s)
        except ValueError:
            return None

    if values and number(values[0]) is not None:
        if len(values) % 2 or any(number(w) is None for w in values[::2]):
            raise ConfigError(f"{flag}: weighted form is 'W DIR W DIR ...', got {values}")
        pairs = [(number(w), d) for w, d in zip(values[::2], values[1::2])]
        if any(w <= 0 for w, _ in pairs):
            raise ConfigError(f"{flag}: weights must be positive, got {values[::2]}")
    else:
        pairs = [(None, d) for d in values]
    for _, d in pairs:
        if not os.path.isdir(d):
            raise ConfigError(f"{flag}: {d} is not a directory of shards")
    return pairs


def check_stopping_and_retention(cfg: TrainConfig) -> None:
    if cfg.exit_signal not in signal.Signals.__members__:
        raise ConfigError(f"--exit-signal {cfg.exit_signal!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    if cfg.exit_signal_handler and cfg.exit_signal in ("SIGKILL", "SIGSTOP"):
        raise ConfigError(f"--exit-signal {cfg.exit_signal} cannot be caught")
    if (cfg.exit_signal_handler or cfg.inject_signal_at is not None) and cfg.save is None:
        raise ConfigError("--exit-signal-handler needs --save: stopping on the signal saves a checkpoint")
    if cfg.inject_signal_at is not None and not cfg.exit_signal_handler:
        raise ConfigError("--inject-signal-at needs --exit-signal-handler")
    if cfg.exit_duration_in_mins is not None and cfg.exit_duration_in_mins <= 0:
        raise ConfigError(f"--exit-duration-in-mins {cfg.exit_duration_in_mins} must be positive")
    if cfg.save_retain_interval is not None:
        if cfg.save is None or cfg.save_interval is None:
            raise ConfigError("--save-retain-interval needs --save and --save-interval")
        if cfg.save_retain_interval < 1 or cfg.save_retain_interval % cfg.save_interval:
            raise ConfigError(f"--save-retain-interval {cfg.save_retain_interval} is not a multiple of "
                              f"--save-interval {cfg.save_interval}: no checkpoint would be saved at its multiples")
    if cfg.save_keep_last is not None and (cfg.save is None or cfg.save_keep_last < 1):
        raise ConfigError("--save-keep-last needs --save and a count >= 1")
    if cfg.async_save and cfg.save is None:
        raise ConfigError("--async-save needs --save: there is nothing to write in the background")


def check_packing(cfg: TrainConfig, dp: int) -> None:
    if cfg.packing_seq_length is None:
        for name in ("packing_buffer_size", "packing_max_images"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"{_flag(name)} needs --packing-seq-length")
        if cfg.no_data_parallel_balance:
            raise ConfigError("--no-data-parallel-balance needs --packing-seq-length: only packed steps are balanced "
                              "(an unpacked step is a fixed number of micro-batches per rank)")
        return
    if cfg.pad_to_seq_length:
        raise ConfigError("--pad-to-seq-length and --packing-seq-length exclude each other")
    if cfg.micro_batch_size != 1:
        raise ConfigError(f"--packing-seq-length needs --micro-batch-size 1 (got {cfg.micro_batch_size}): "
                          "a micro-batch is one packed row, its size set by --packing-seq-length")
    if cfg.packing_seq_length < cfg.seq_length:
        raise ConfigError(f"--packing-seq-length {cfg.packing_seq_length} is below --seq-length {cfg.seq_length}: "
                          "the longest sample would not fit in a row")
    if cfg.packing_seq_length % 8:
        raise ConfigError(f"--packing-seq-length {cfg.packing_seq_length} must be a multiple of 8 "
                          "(rows are padded to multiples of 8)")
    per_rank = (cfg.global_batch_size or dp) // dp
    if cfg.packing_buffer_size is not None and not 1 <= cfg.packing_buffer_size <= per_rank:
        raise ConfigError(f"--packing-buffer-size {cfg.packing_buffer_size} must be in [1, global batch / DP = "
                          f"{per_rank}]: packing never reaches across steps, so that resuming stays exact")
    if cfg.packing_max_images is not None and cfg.packing_max_images < 1:
        raise ConfigError("--packing-max-images must be >= 1")


def packing_max_images(cfg: TrainConfig) -> int:
    """The cap on images per packed row. Measured on a LLaVA-like mix (tools/bench_packing.py, rows of 2048,
    steps of 16 samples): without pipeline parallelism no cap costs padding (rows are only as long as their
    text); under it a step's rows are padded to its longest, and caps 8 / 16 / none gave padding efficiencies
    0.71 / 0.83 / 0.83. S // 128 (16 at 2048) loses nothing there and bounds a row's vision keys."""
    return cfg.packing_max_images or default_max_images(cfg.packing_seq_length)


def default_max_images(packing_seq_length: int) -> int:
    return max(1, packing_seq_length // 128)


MOD_FLAGS = ("mod_layers", "mod_capacity", "mod_aux_loss_coeff", "mod_threshold", "mod_router_bias", "mod_skip")


def encoder_tensor_parallel_size(cfg: TrainConfig) -> int:
    """--encoder-tensor-model-parallel-size, or the faster placement for these micro-batches, as measured
    (tools/bench_encoder_placement.py; docs/parallelism.md, "Tensor parallelism: where the encoder runs").

    Replicated, each of the T ranks encodes ceil(b / T) of a micro-batch's b images, and saves the sharded
    encoder's all-reduces: 1.09-1.12x faster at TP=2 when the images split evenly, as fast at b = 7 (a share 14%
    above even), 0.85x at b = 3 and 0.63x at b = 1. So padded micro-batches (b = --micro-batch-size) replicate
    when a share is at most 10% above an even split. A packed row's image count varies (up to
    --packing-max-images): for 5 to 16 images a share averages 1.06x even at T = 2 (replicate), 1.18x at T = 4
    (shard, as for larger T)."""
    if cfg.encoder_tensor_model_parallel_size is not None:
        return cfg.encoder_tensor_model_parallel_size
    tp = cfg.tensor_model_parallel_size
    if cfg.packing_seq_length is not None:
        return 1 if tp <= 2 else tp
    images = cfg.micro_batch_size
    return 1 if tp * math.ceil(images / tp) <= 1.1 * images else tp


def parse_mod_layers(value, num_layers: Optional[int] = None) -> tuple[int, ...]:
    """`--mod-layers 3,4,5` (or a YAML list) -> (3, 4, 5); checked against the model's layer count if given."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    try:
        layers = tuple(int(i) for i in items)
    except ValueError:
        raise ConfigError(f"--mod-layers {value!r}: expected comma-separated layer indices, e.g. 3,4,5") from None
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise ConfigError(f"--mod-layers {value!r}: expected distinct non-negative layer indices")
    if num_layers is not None and max(layers) >= num_layers:
        raise ConfigError(f"--mod-layers {value!r}: the model has layers 0..{num_layers - 1}")
    return tuple(sorted(layers))


def _given_mod_flags(cfg: TrainConfig) -> list[str]:
    return [n for n in MOD_FLAGS if getattr(cfg, n) is not None and getattr(cfg, n) is not False]


def check_gamma_mod_flags(cfg: TrainConfig) -> None:
    """What can be refused before a checkpoint is read."""
    given = _given_mod_flags(cfg)
    if not cfg.gamma_mod:
        if given and cfg.load is None:
            raise ConfigError(f"{_flag(given[0])} needs --gamma-mod")
        return
    if cfg.load is None and cfg.arch != "vanilla":
        raise ConfigError(f"--gamma-mod needs --arch vanilla (got --arch {cfg.arch}): MoD layers skip image tokens "
                          "of the vanilla sequence")
    check_gamma_mod_training(cfg, "--gamma-mod")
    if cfg.mod_layers is not None:
        parse_mod_layers(cfg.mod_layers)
    _check_mod_values(cfg)


def check_gamma_mod_training(cfg: TrainConfig, what: str) -> None:
    if cfg.stage == "pretrain":
        raise ConfigError(f"{what}: gamma-MoD trains in the finetune stage (its router and MoD layers are LM "
                          "parameters, frozen in pretrain); use --stage finetune")
    if cfg.packing_seq_length is not None:
        raise ConfigError(f"{what} does not support --packing-seq-length (MoD routes within one sample's sequence)")
    if cfg.sequence_parallel:
        raise ConfigError(f"{what} does not support --sequence-parallel (routing picks tokens over the whole "
                          "sequence)")
    if cfg.fp8_format is not None:
        raise ConfigError(f"{what} does not support --fp8-format (a MoD layer's routed token count is not a "
                          "multiple of 8)")


def _check_mod_values(cfg: TrainConfig) -> None:
    if cfg.mod_capacity is not None and not 0 < cfg.mod_capacity <= 1:
        raise ConfigError(f"--mod-capacity {cfg.mod_capacity} must be in (0, 1]")
    if cfg.mod_aux_loss_coeff is not None and cfg.mod_aux_loss_coeff < 0:
        raise ConfigError(f"--mod-aux-loss-coeff {cfg.mod_aux_loss_coeff} must be >= 0")
    if cfg.mod_threshold is not None and not 0 <= cfg.mod_threshold < 1:
        raise ConfigError(f"--mod-threshold {cfg.mod_threshold} must be in [0, 1)")


def gamma_mod_settings(cfg: TrainConfig, arch: str, num_layers: int, recorded: Optional[dict]) -> Optional[dict]:
    """The gamma-MoD TransformerConfig overrides for this run, or None for a dense model.

    recorded: the gamma-MoD record of the checkpoint being loaded (`train_state["gamma_mod"]`), if any; its
    settings apply, and the flags given override them.
    """
    from himix_megatron.model.gamma_mod import config_overrides

    given = _given_mod_flags(cfg)
    if not cfg.gamma_mod and recorded is None:
        if given:
            raise ConfigError(f"{_flag(given[0])} needs --gamma-mod (the checkpoint is not a gamma-MoD model)")
        return None
    what = "--gamma-mod" if cfg.gamma_mod else f"the gamma-MoD checkpoint {cfg.load}"
    if arch != "vanilla":
        raise ConfigError(f"--gamma-mod needs a vanilla model; --load {cfg.load} holds arch {arch}")
    check_gamma_mod_training(cfg, what)
    _check_mod_values(cfg)
    settings = config_overrides(recorded or {})
    if cfg.mod_layers is not None:
        settings["mod_layers"] = parse_mod_layers(cfg.mod_layers, num_layers)
    elif settings.get("mod_layers") is not None:
        settings["mod_layers"] = parse_mod_layers(settings["mod_layers"], num_layers)
    else:
        from himix_megatron.config import default_mod_layers

        if not default_mod_layers(num_layers):
            raise ConfigError(f"--gamma-mod: a {num_layers}-layer model has no default MoD layer (every layer but "
                              "the first three and the last); give --mod-layers")
    for name in ("mod_capacity", "mod_aux_loss_coeff", "mod_threshold", "mod_skip"):
        if getattr(cfg, name) is not None:
            settings[name] = getattr(cfg, name)
    if cfg.mod_router_bias:
        if recorded is not None and not recorded.get("mod_router_bias", False):
            raise ConfigError(f"--mod-router-bias: the checkpoint {cfg.load}'s router has no bias")
        settings["mod_router_bias"] = True
    return settings


def check(cfg: TrainConfig, world_size: int, *, te_available: bool, cuda: bool) -> None:
    """Refuse impossible settings before any compute. Raises ConfigError naming the flag."""
    model_parallel = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not a multiple of --tensor-model-parallel-size x "
                          f"--pipeline-model-parallel-size = {model_parallel}")
    e = cfg.encoder_tensor_model_parallel_size
    if e is not None and (e < 1 or cfg.tensor_model_parallel_size % e):
        raise ConfigError(f"--encoder-tensor-model-parallel-size {e} must divide --tensor-model-parallel-size "
                          f"{cfg.tensor_model_parallel_size}")
    dp = world_size // model_parallel
    if cfg.micro_batch_size < 1:
        raise ConfigError("--micro-batch-size must be >= 1")
    if cfg.global_batch_size is not None and cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
                          f"x data-parallel size = {cfg.micro_batch_size} x {dp}")
    given = [n for n in ("train_iters", "train_samples", "train_epochs") if getattr(cfg, n) is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of --train-iters, --train-samples, --train-epochs"
                          + (f" (got {', '.join(_flag(n) for n in given)})" if given else ""))
    if not cfg.data_path:
        raise ConfigError("--data-path is required")
    check_packing(cfg, dp)
    check_gamma_mod_flags(cfg)
    if cfg.fp8_format is not None:
        if not (cuda and te_available):
            raise ConfigError(f"--fp8-format {cfg.fp8_format} needs Transformer Engine on a GPU; this machine has "
                              f"{'a GPU' if cuda else 'no GPU'} and {'' if te_available else 'no '}Transformer Engine")
        if not cfg.bf16:
            raise ConfigError("--fp8-format needs --bf16 (FP8 GEMMs inside a BF16 model, as in Megatron-LM)")
    check_fp8_flags(cfg)
    if cfg.sequence_parallel and cfg.tensor_model_parallel_size == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if cfg.pad_to_seq_length:
        # Fixed widths: the GEMMs see seq_length x micro-batch rows (/ TP under sequence parallelism).
        split = cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1
        if cfg.seq_length % split:
            raise ConfigError(f"--sequence-parallel splits --seq-length {cfg.seq_length} over "
                              f"--tensor-model-parallel-size {split}: it must divide it")
        align = row_align(cfg.fp8_recipe, cfg.sequence_parallel) if cfg.fp8_format is not None else 1
        if (cfg.seq_length // split * cfg.micro_batch_size) % align:
            raise ConfigError(f"--fp8-recipe {cfg.fp8_recipe} needs the text GEMM rows, --seq-length {cfg.seq_length}"
                              + (f" / TP {split}" if split > 1 else "") + f" x --micro-batch-size "
                              f"{cfg.micro_batch_size}, to be a multiple of {align}")
    if cfg.save_interval is not None and cfg.save is None:
        raise ConfigError("--save-interval needs --save")
    check_stopping_and_retention(cfg)
    from himix_megatron.training import wandb_run

    wandb_run.check(cfg)
    if cfg.eval_interval is not None and not cfg.valid_data_path:
        raise ConfigError("--eval-interval needs --valid-data-path")
    if cfg.overlap_grad_reduce and cfg.pipeline_model_parallel_size > 1:
        raise ConfigError("--overlap-grad-reduce is not wired for pipeline parallelism here; drop it")
    if not 0 <= cfg.lr_warmup_fraction < 1:
        raise ConfigError(f"--lr-warmup-fraction {cfg.lr_warmup_fraction} must be in [0, 1)")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    for name in ("log_interval", "max_bad_steps", "num_workers"):
        if getattr(cfg, name) < (0 if name == "num_workers" else 1):
            raise ConfigError(f"{_flag(name)} must be positive")
    parse_data_path(cfg.data_path)
    if cfg.valid_data_path:
        parse_data_path(cfg.valid_data_path, "--valid-data-path")
