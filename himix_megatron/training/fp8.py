"""FP8 training: Megatron-LM's `--fp8-format`, `--fp8-recipe` and `--fp8-param-gather`, and what each recipe needs.

The recipe itself is megatron-core's: the trainer sets TransformerConfig's `fp8`, `fp8_recipe` and `fp8_param`,
and megatron-core 0.16.1 (`fp8_utils.get_fp8_recipe`) builds TE's `DelayedScaling`, `Float8CurrentScaling`
(tensorwise), `MXFP8BlockScaling` or `Float8BlockScaling` from them; its TransformerBlock enters
`fp8_autocast` around each layer, and with `fp8_param` builds the layers under `fp8_model_init`. The frozen
vision encoder has its own config, built without any of these fields, and runs before the decoder, outside
every autocast: it stays in BF16 under every recipe (tests/test_gpu_path.py checks the configs).

What each recipe needs (Transformer Engine 2.9-2.11, read from its sources):
- delayed, tensorwise: compute capability 8.9+ (TE's `check_fp8_support`); tensorwise needs TE >= 2.2
  (megatron-core builds Float8CurrentScaling only from 2.2.0.dev0 on). Shapes: TE's linears assert, for
  every GEMM input and weight, rows (the product of all but the last dimension) % 8 == 0 and the last
  dimension % 16 == 0 (`utils.assert_dim_for_fp8_exec`); the weight-gradient GEMM contracts over the rows,
  and cuBLAS FP8 wants leading dimensions of 16 bytes, which is why megatron-core pads to 16
  (`fp8_utils.get_fp8_align_size`).
- blockwise (Float8BlockScaling, 1x128 activations, 128x128 weights): compute capability 9.0+ and CUDA 12.9+
  (`check_fp8_block_scaling_support`), TE >= 2.3; its cuBLAS GEMM checks leading dimensions % 16 and outer
  dimensions % 8 ("Caller must pad", `cublaslt_gemm.cu`), so again 16.
- mxfp8 (MXFP8BlockScaling, 32-element blocks): compute capability 10.x (Blackwell; TE refuses 12.0+ and
  pre-10.0, `check_mxfp8_support`); `MXFP8Quantizer.make_empty` asserts both the rows and the last dimension
  are multiples of 32.
So every GEMM dimension (rows, input and output features) must be a multiple of megatron-core's
`get_fp8_align_size(recipe)`: 16, or 32 for mxfp8. Text rows are padded to it by the loader
(`training/data.row_multiple`); HiMix's vision K/V rows (N x images, any number of images) are padded to it
inside the layer (`MixtureAttention.vision_key_value`); the feature dimensions are checked here, before
step 1, and so is vanilla's N, which sits inside its sequence.
"""

from __future__ import annotations

from typing import Optional

from himix_megatron.config import ConfigError

FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("tensorwise", "delayed", "mxfp8", "blockwise")  # megatron-core 0.16.1's, less "custom"

# (the oldest TE that serves it, the GPUs that serve it as compute capabilities [low, high), CUDA needed)
_NEEDS = {
    "delayed": ("2.0", (8, 9), None, None),
    "tensorwise": ("2.2.0.dev0", (8, 9), None, None),
    "blockwise": ("2.3.0.dev0", (9, 0), None, "12.9"),
    "mxfp8": ("2.1.0", (10, 0), (12, 0), None),
}


def fp8_align(recipe: str) -> int:
    """Every FP8 GEMM dimension must be a multiple of this: megatron-core's own figure (16; 32 for mxfp8)."""
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    return get_fp8_align_size(Fp8Recipe(recipe))


def row_align(recipe: str, sequence_parallel: bool) -> int:
    """Each rank's text rows must be a multiple of this: `fp8_align`, except that under sequence parallelism the
    column-parallel linears all-gather their FP8 input, and TE asserts the quantizer can take it
    (`assert_dim_for_all_gather`): Float8BlockQuantizer.is_quantizable wants rows and features % 128."""
    return 128 if recipe == "blockwise" and sequence_parallel else fp8_align(recipe)


def recipe_problem(recipe: str, capability: tuple, te_version: Optional[str], cuda_version: Optional[str]
                   ) -> Optional[str]:
    """Why this GPU / TE / CUDA cannot run `recipe`, or None. Pure, so the rules are tested without a GPU."""
    from packaging.version import Version

    oldest_te, low, high, cuda = _NEEDS[recipe]
    gpu = f"compute capability {capability[0]}.{capability[1]}"
    if tuple(capability) < low:
        return f"{gpu}: --fp8-recipe {recipe} needs {low[0]}.{low[1]} or newer" + (
            " (Blackwell)" if recipe == "mxfp8" else "")
    if high is not None and tuple(capability) >= high:
        return f"{gpu}: Transformer Engine does not serve --fp8-recipe {recipe} on {high[0]}.{high[1]}+ GPUs"
    if te_version is None or Version(te_version) < Version(oldest_te):
        return f"--fp8-recipe {recipe} needs Transformer Engine >= {oldest_te} (found {te_version or 'none'})"
    if cuda is not None and (cuda_version is None or Version(cuda_version) < Version(cuda)):
        return f"--fp8-recipe {recipe} needs CUDA >= {cuda} (torch was built with {cuda_version or 'no CUDA'})"
    return None


def gpu_recipe_problem(recipe: str) -> Optional[str]:
    """`recipe_problem` for this process's GPU, Transformer Engine and CUDA (a GPU machine only)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        te_version = version("transformer_engine")
    except PackageNotFoundError:
        te_version = None
    return recipe_problem(recipe, torch.cuda.get_device_capability(), te_version, torch.version.cuda)


def check_fp8_flags(cfg) -> None:
    """Flag combinations, before anything is built (TrainConfig `cfg`)."""
    if cfg.fp8_format is not None and cfg.packing_seq_length is not None:
        multiple = row_align(cfg.fp8_recipe, cfg.sequence_parallel) * (
            cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1)
        if cfg.packing_seq_length % multiple:
            raise ConfigError(f"--packing-seq-length {cfg.packing_seq_length} must be a multiple of {multiple} under "
                              f"--fp8-recipe {cfg.fp8_recipe}: packed rows are padded to that many tokens")
    if cfg.fp8_param_gather:
        if cfg.fp8_format is None:
            raise ConfigError("--fp8-param-gather keeps the weights in FP8: it needs --fp8-format")
        if not cfg.use_distributed_optimizer:
            raise ConfigError("--fp8-param-gather needs --use-distributed-optimizer (as in Megatron-LM: the FP8 "
                              "weights are all-gathered from the optimizer's shards)")


def transformer_overrides(cfg) -> dict:
    """The TransformerConfig fields from which megatron-core builds the recipe (empty without --fp8-format)."""
    if cfg.fp8_format is None:
        return {}
    fields = dict(fp8=cfg.fp8_format, fp8_recipe=cfg.fp8_recipe, fp8_param=cfg.fp8_param_gather)
    if cfg.fp8_recipe == "delayed":
        fields.update(fp8_margin=cfg.fp8_margin, fp8_amax_history_len=cfg.fp8_amax_history_len,
                      fp8_amax_compute_algo=cfg.fp8_amax_compute_algo)
    return fields


def layout_problems(recipe: str, description, tensor_parallel: int = 1, sequence_parallel: bool = False,
                    micro_batch_size: int = 1, packed: bool = False) -> list[str]:
    """The FP8 GEMM dimensions of this model that `recipe` cannot take (`description`: a ModelDescription)."""
    align = fp8_align(recipe)
    lm, vision = description.language, description.vision
    tp = tensor_parallel
    dims = {
        "hidden size": lm.hidden_size,
        "FFN width / TP": lm.ffn_hidden_size // tp,
        "QKV projection width / TP": (lm.num_attention_heads + 2 * lm.num_query_groups) * lm.kv_channels // tp,
        "attention output width / TP": lm.num_attention_heads * lm.kv_channels // tp,
    }
    if description.arch == "himix":
        dims["vision width d_v (RMSNorm_v + W_K,v / W_V,v input)"] = vision.hidden_size
        dims["vision K/V width / TP"] = 2 * lm.num_query_groups * lm.kv_channels // tp
    if description.arch == "hierarchical":
        dims["vision width d_v (per-layer connector input)"] = vision.hidden_size
    problems = [f"{what} {value} is not a multiple of {align}" for what, value in dims.items() if value % align]
    if recipe == "blockwise" and sequence_parallel and lm.hidden_size % 128:
        problems.append(f"hidden size {lm.hidden_size} is not a multiple of 128 (blockwise FP8 all-gathers the "
                        "sequence-parallel input in 128-wide blocks)")
    if description.arch == "vanilla":
        # The text widths are padded to the multiple already; the N image tokens of each image sit in the sequence:
        # a micro-batch holds N x micro-batch of them, a packed row N x (any number of images).
        n, split = vision.num_features, tp if sequence_parallel else 1
        if split > 1 and n % (align * split):
            problems.append(f"the N = {n} image tokens in vanilla's sequence are not a multiple of {align * split} "
                            f"({align} per TP rank under --sequence-parallel)")
        elif packed and n % align:
            problems.append(f"the N = {n} image tokens of each image in a packed row are not a multiple of {align}")
        elif n * micro_batch_size % align:
            problems.append(f"the N x micro-batch = {n} x {micro_batch_size} image tokens of a micro-batch are not "
                            f"a multiple of {align} (choose --micro-batch-size accordingly)")
    return problems


def check_layout(cfg, description) -> None:
    """Refuse, before step 1, a model whose FP8 GEMMs the chosen recipe cannot run."""
    if cfg.fp8_format is None:
        return
    problems = layout_problems(cfg.fp8_recipe, description, cfg.tensor_model_parallel_size, cfg.sequence_parallel,
                               cfg.micro_batch_size, cfg.packing_seq_length is not None)
    if problems:
        raise ConfigError(f"--fp8-recipe {cfg.fp8_recipe} needs every FP8 GEMM dimension to be a multiple of "
                          f"{fp8_align(cfg.fp8_recipe)}, but " + "; ".join(problems)
                          + ": choose another --fp8-recipe, or train in bf16 (drop --fp8-format)")

