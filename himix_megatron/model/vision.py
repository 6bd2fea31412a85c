"""The frozen vision encoder on megatron-core's `CLIPViTModel`: SigLIP (so400m-patch14-384) or CLIP.

HiMix consumes the **penultimate** layer's output, without the post-layernorm, first token dropped:
[N, b, d_v] = [728, b, 1152] for SigLIP-384, sequence-first like every megatron activation.

- SigLIP (`VisionModelConfig.kind == "siglip"`, model_subtype "siglip"): no class token, the first
  *patch* is dropped (N = patches - 1), gelu(tanh).
- CLIP (`kind == "clip"`, model_subtype "clip": class token, bias-free patch conv, pre-LayerNorm
  `ln_pre`): LLaVA's feature selection, hidden_states[-2][:, 1:], i.e. the class token is dropped and
  every patch kept (N = patches: 576 for ViT-L/14-336, 196 / 49 for TinyCLIP ViT-39M/16 / -40M/32).
  The activation follows the HF config's `hidden_act` (OpenAI CLIP: quick_gelu; TinyCLIP: gelu).
  `load_hf_clip_state_dict` reads a `CLIPVisionModel` or a `CLIPModel`'s vision tower.

Choices:
- Penultimate layer: the encoder is built with `num_layers - 1` layers and no `ln_post`, so its
  output *is* `hidden_states[-2]`. The last layer (15.2M), post-layernorm and pooling head (15.2M)
  never influence HiMix, so they are not built: so400m here has 397,745,440 of SigLIP's 428,225,600
  parameters. `load_hf_siglip_state_dict` reports their Hugging Face weights as unused.
- Frozen: parameters have `requires_grad=False` (so DDP and the optimizer never see them), the
  module stays in eval mode whatever `.train()` is called with, and `forward` runs under
  `torch.no_grad()`.
- Tensor parallelism: the encoder is sharded over E ranks of the TP group and replicated over the
  T / E copies (parallel/encoder.py chooses E and gathers the copies' shares of the images). Inside a
  copy, QKV/FC1 are column-parallel and proj/FC2 row-parallel; a row-parallel linear all-reduces its
  output when sequence parallelism is off, so every layer's output (and so the features) is full and
  identical on the copy's ranks. The encoder's config therefore always has `sequence_parallel=False`
  (CLIPViTModel does not scatter its input), and `pipeline_model_parallel_size=1`: the whole encoder
  lives on the stage that calls it.
- Layer spec: megatron's `get_vit_layer_with_local_spec` gives the local ViT a *causal* mask
  (megatron-core 0.16.1), which is wrong for SigLIP; the local spec here uses `no_mask` and SDPA.
  With Transformer Engine on a GPU, megatron's TE ViT spec (already `no_mask`) is used.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor

from himix_megatron.config import ConfigError, ParallelConfig, VisionModelConfig
from himix_megatron.model.core_attention import SDPAttention, te_available
from himix_megatron.parallel.encoder import SHARDED, EncoderPlacement, encode_split, mark_copies_as_replicas

logger = logging.getLogger(__name__)


def gelu_tanh(x: Tensor) -> Tensor:
    """SigLIP's activation (`gelu_pytorch_tanh` in transformers)."""
    return F.gelu(x, approximate="tanh")


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's activation (`quick_gelu` in transformers): x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU, `gelu` in transformers (open_clip's nn.GELU, e.g. TinyCLIP)."""
    return F.gelu(x)


# transformers' hidden_act name -> the function the encoder's MLP applies.
ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "quick_gelu": quick_gelu, "gelu": gelu}


def build_vision_config(
    vision: VisionModelConfig,
    parallel: ParallelConfig = ParallelConfig(),
    *,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
) -> TransformerConfig:
    """TransformerConfig for the first `num_layers - 1` encoder layers, sharded over `parallel.encoder_tp` ranks."""
    tp = parallel.encoder_tp
    if vision.num_layers < 2:
        raise ConfigError(f"{vision.name}: num_layers={vision.num_layers}; the penultimate layer needs >= 2")
    if vision.hidden_size % vision.num_attention_heads:
        raise ConfigError(f"{vision.name}: hidden_size is not a multiple of num_attention_heads")
    for field in ("num_attention_heads", "ffn_hidden_size"):
        if getattr(vision, field) % tp:
            raise ConfigError(f"the encoder's tensor-parallel size {tp} (encoder_tensor_model_parallel_size) "
                              f"does not divide {vision.name}'s {field}={getattr(vision, field)}")
    cuda = torch.cuda.is_available()
    fields = dict(
        num_layers=vision.num_layers - 1,  # penultimate layer: see the module docstring
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_attention_heads,
        num_query_groups=vision.num_attention_heads,  # plain multi-head attention
        kv_channels=vision.hidden_size // vision.num_attention_heads,
        ffn_hidden_size=vision.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=vision.norm_epsilon,
        gated_linear_unit=False,
        activation_func=ACTIVATIONS[vision.hidden_act],
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        bias_activation_fusion=False,  # megatron fuses only gelu(erf) / swiglu
        masked_softmax_fusion=False,
        bias_dropout_fusion=cuda,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def vision_layer_spec(use_te: Optional[bool] = None) -> ModuleSpec:
    """SigLIP encoder layer: pre-LayerNorm attention (no mask) and GELU MLP, biases everywhere.

    use_te: Transformer Engine's ViT spec, the local one, or (None) whichever the machine allows."""
    if te_available() if use_te is None else use_te:
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

        return get_vit_layer_with_transformer_engine_spec()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=SDPAttention, linear_proj=RowParallelLinear
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
            ),
            mlp_bda=get_bias_dropout_add,
            # The TE spec fuses these norms into the following linears; saving under the fused names lets
            # local and TE checkpoints load each other (as megatron-core's local GPT spec does).
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                         "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


class VisionEncoder(CLIPViTModel):
    """Frozen SigLIP or CLIP: `forward(pixel_values [b, 3, H, W]) -> features [N, b, d_v]` (full on every TP rank).

    placement: how it sits in its tensor-parallel group (parallel/encoder.py); by default sharded over all of it."""

    def __init__(self, config: TransformerConfig, vision: VisionModelConfig, spec: Optional[ModuleSpec] = None,
                 placement: EncoderPlacement = SHARDED):
        grid = vision.image_size // vision.patch_size * vision.patch_size
        if vision.kind == "clip":
            if grid != vision.image_size:
                raise ConfigError(f"{vision.name}: CLIP needs image_size={vision.image_size} to be a multiple of "
                                  f"patch_size={vision.patch_size} (its position embeddings cover whole patches)")
            kind = dict(ln_pre_impl=WrappedTorchNorm, add_class_token=True, class_token_len=1, model_subtype="clip")
        else:
            kind = dict(ln_post_impl=IdentityOp,  # hidden_states[-2] has no post-layernorm
                        add_class_token=False, class_token_len=0, model_subtype="siglip")
        super().__init__(
            config,
            spec or vision_layer_spec(),
            patch_dim=vision.patch_size,
            # CLIPViTModel wants a whole number of patches; SigLIP-384's stride-14 'valid' conv reads
            # 27 x 27 patches and ignores the last 384 - 378 = 6 pixel rows and columns, as in HF.
            img_h=grid,
            img_w=grid,
            pg_collection=_with_tp_group(placement.tp_group),
            **kind,
        )
        self.vision = vision
        self.placement = placement
        self.tp_group = placement.tp_group or parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        if get_pg_size(self.tp_group) != config.tensor_model_parallel_size:
            raise ConfigError(f"{vision.name}: the encoder's config has tensor_model_parallel_size="
                              f"{config.tensor_model_parallel_size} but its placement shards it over "
                              f"{get_pg_size(self.tp_group)} ranks (build both from one ParallelConfig)")
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "VisionEncoder":
        return super().train(False)  # frozen: always eval (no dropout), whatever the caller asks

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        size = self.vision.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [b, 3, {size}, {size}], got {tuple(pixel_values.shape)}")
        if self.placement.replicated:
            return encode_split(self._encode, pixel_values, self.placement)
        return self._encode(pixel_values)

    def _encode(self, pixel_values: Tensor) -> Tensor:
        if not len(pixel_values):  # a copy's share when a micro-batch has fewer images than copies
            return self.conv1.weight.new_empty(self.vision.num_features, 0, self.vision.hidden_size)
        x = super().forward(pixel_values.to(self.conv1.weight.dtype))  # [b, s, h]
        # SigLIP: drop the first patch; CLIP: drop the class token (it comes first) -> [N, b, h]
        return x[:, 1:].transpose(0, 1).contiguous()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        return mark_copies_as_replicas(super().sharded_state_dict(prefix, sharded_offsets, metadata), self.placement)

    @property
    def tp_rank_and_size(self) -> tuple[int, int]:
        """This rank's place among the ranks sharding its copy of the encoder."""
        return get_pg_rank(self.tp_group), get_pg_size(self.tp_group)


def _with_tp_group(tp_group) -> Optional[ProcessGroupCollection]:
    """megatron's process groups with the encoder's own TP group; None (megatron's own) when it has none."""
    if tp_group is None:
        return None
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.tp = tp_group
    return groups


# --- Hugging Face weights ---------------------------------------------------------------------


class HFWeightError(ValueError):
    """A Hugging Face tensor the encoder needs is missing or has the wrong shape."""


_PATCH_KEY = "embeddings.patch_embedding.weight"
# megatron layer module -> transformers SiglipEncoderLayer module (q/k/v are fused separately).
_LAYER_NAMES = {"input_layernorm": "layer_norm1", "self_attention.linear_proj": "self_attn.out_proj",
                "pre_mlp_layernorm": "layer_norm2", "mlp.linear_fc1": "mlp.fc1", "mlp.linear_fc2": "mlp.fc2"}
# The TE spec fuses the pre-attention / pre-MLP LayerNorms into the following linear.
_FROM_TE = {f"{linear}.layer_norm_{kind}": f"{norm}.{kind}" for kind in ("weight", "bias")
            for norm, linear in (("input_layernorm", "self_attention.linear_qkv"),
                                 ("pre_mlp_layernorm", "mlp.linear_fc1"))}


def _vision_prefix(hf_state_dict: Mapping[str, Tensor], what: str = "SigLIP") -> str:
    """'' for SiglipVisionModel, 'vision_model.' inside SiglipModel, '...vision_tower.' inside a VLM
    (likewise for CLIP: '' or 'vision_model.' for CLIPVisionModel, 'vision_model.' inside CLIPModel)."""
    prefixes = sorted(k[: -len(_PATCH_KEY)] for k in hf_state_dict if k.endswith(_PATCH_KEY))
    if len(prefixes) != 1:
        raise HFWeightError(
            f"expected exactly one {what} vision tower ('*{_PATCH_KEY}') in the state dict, found {prefixes or 'none'}"
        )
    return prefixes[0]


def _full_shape(param: Tensor, tp_size: int) -> tuple[int, ...]:
    """Shape of a parameter before megatron split it over `tp_size` tensor-parallel ranks."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def load_hf_siglip_state_dict(encoder: VisionEncoder, hf_state_dict: Mapping[str, Tensor]) -> list[str]:
    """Copy `transformers` SigLIP vision weights into `encoder`; returns the unused HF vision keys.

    Layers 0..L-2 are loaded (the encoder has L-1 layers); the last layer, `post_layernorm` and
    `head.*` are expected to be unused and are returned (keys outside the vision tower, e.g. a
    SiglipModel's text model, are ignored). q/k/v are fused into megatron's `linear_qkv` layout
    (per query group: the group's q heads, then its k, then its v) and every tensor-parallel
    parameter receives this rank's slice.
    """
    return _load_hf_vision(encoder, hf_state_dict, "SigLIP")


def load_hf_clip_state_dict(encoder: VisionEncoder, hf_state_dict: Mapping[str, Tensor]) -> list[str]:
    """Copy `transformers` CLIP vision weights (a `CLIPVisionModel`, or the `vision_model.*` tower of a
    `CLIPModel` / a LLaVA checkpoint) into a kind="clip" `encoder`; returns the unused HF vision keys.

    As for SigLIP, layers 0..L-2 are loaded and the last layer and `post_layernorm` come back unused
    (a CLIPModel's `visual_projection`, outside the tower, is ignored). Besides the layers: the class
    embedding ([d] in HF, [1, 1, d] in megatron), the bias-free patch conv, the position embeddings
    (class token first) and `pre_layrnorm` (sic, transformers' name) -> `ln_pre`.
    """
    if encoder.vision.kind != "clip":
        raise HFWeightError(f"{encoder.vision.name} is a {encoder.vision.kind!r} encoder, not a CLIP one")
    return _load_hf_vision(encoder, hf_state_dict, "CLIP")


def load_hf_vision_state_dict(encoder: VisionEncoder, hf_state_dict: Mapping[str, Tensor]) -> list[str]:
    """`load_hf_clip_state_dict` or `load_hf_siglip_state_dict`, as `encoder.vision.kind` says."""
    if encoder.vision.kind == "clip":
        return load_hf_clip_state_dict(encoder, hf_state_dict)
    return load_hf_siglip_state_dict(encoder, hf_state_dict)


def _load_hf_vision(encoder: VisionEncoder, hf_state_dict: Mapping[str, Tensor], what: str) -> list[str]:
    prefix = _vision_prefix(hf_state_dict, what)
    config = encoder.config
    groups, head_dim = config.num_query_groups, config.kv_channels
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> Tensor:
        key = prefix + name
        if key not in hf_state_dict:
            raise HFWeightError(f"missing Hugging Face tensor {key!r}")
        tensor = hf_state_dict[key]
        if tuple(tensor.shape) != tuple(shape):
            raise HFWeightError(
                f"shape mismatch for Hugging Face tensor {key!r}: {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        used.add(key)
        return tensor

    def source(name: str, shape: tuple[int, ...]) -> Tensor:
        """The full (unsharded) value of megatron parameter `name`, from the HF tensors."""
        if name in ("conv1.weight", "conv1.bias"):
            return take("embeddings.patch_embedding." + name.split(".")[-1], shape)
        if name == "position_embeddings.weight":
            return take("embeddings.position_embedding.weight", shape)
        if name == "class_token":  # CLIP: [1, 1, d] here, [d] in HF
            return take("embeddings.class_embedding", shape[-1:]).reshape(shape)
        if name in ("ln_pre.weight", "ln_pre.bias"):
            return take("pre_layrnorm." + name.split(".")[-1], shape)
        parts = name.split(".")
        if parts[:2] != ["decoder", "layers"]:
            raise HFWeightError(f"no Hugging Face source for encoder parameter {name!r}")
        hf = f"encoder.layers.{int(parts[2])}."
        local = ".".join(parts[3:])
        local = _FROM_TE.get(local, local)
        kind = local.rsplit(".", 1)[-1]  # weight / bias
        if local.startswith("self_attention.linear_qkv."):
            rest = shape[1:]
            q = take(f"{hf}self_attn.q_proj.{kind}", (config.num_attention_heads * head_dim, *rest))
            k = take(f"{hf}self_attn.k_proj.{kind}", (groups * head_dim, *rest))
            v = take(f"{hf}self_attn.v_proj.{kind}", (groups * head_dim, *rest))
            fused = torch.cat([t.reshape(groups, -1, *rest) for t in (q, k, v)], dim=1)
            return fused.reshape(shape)
        module = local.rsplit(".", 1)[0]
        if module not in _LAYER_NAMES:
            raise HFWeightError(f"no Hugging Face source for encoder parameter {name!r}")
        return take(f"{hf}{_LAYER_NAMES[module]}.{kind}", shape)

    tp_rank, tp_size = encoder.tp_rank_and_size
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            full = source(name, _full_shape(param, tp_size))
            if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
                full = full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
            param.copy_(full)
    # (older CLIP checkpoints also store the `embeddings.position_ids` buffer: not a weight)
    unused = sorted(k for k in hf_state_dict if k.startswith(prefix) and k not in used
                    and not k.endswith("embeddings.position_ids"))
    logger.info("loaded %d %s tensors; unused (expected: last layer, post_layernorm%s): %s",
                len(used), what, ", head" if what == "SigLIP" else "", unused)
    return unused
