"""HiMix configuration for Hugging Face transformers (remote code).

This file is copied verbatim next to exported weights, so it imports only transformers.

The language-model fields are those of a Llama / Qwen2 config, kept flat (not nested under `text_config`) so
that the converter can read and write them under their usual names. RoPE stays in the legacy pair
`rope_theta` + `rope_scaling` (a Llama-3 style dict or None) rather than transformers 5's `rope_parameters`:
it is the form every Llama-3 / Qwen2 checkpoint config still carries, and the model computes its own
frequencies from it.

The vision tower is a SigLIP or a CLIP one: `vision_config` is a SiglipVisionConfig or a CLIPVisionConfig, chosen
by its `model_type`. Exports made before CLIP support, whose vision_config is SigLIP's, load unchanged (a
vision_config without a model_type is taken to be SigLIP's, as it always was).
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, PreTrainedConfig, SiglipVisionConfig

# vision_config.model_type -> its config class.
VISION_CONFIGS = {"siglip_vision_model": SiglipVisionConfig, "clip_vision_model": CLIPVisionConfig}


class HiMixConfig(PreTrainedConfig):
    model_type = "himix"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # transformers >= 5.20 declares sub-configs in `sub_configs_defaults` (and derives `sub_configs` from it);
    # earlier 5.x releases read `sub_configs` only. Both are given, and __post_init__ builds the vision config
    # itself, so the same file serves both sides. transformers reads only their keys (to reach the sub-config, e.g.
    # to set its attention implementation), so a CLIPVisionConfig in the SigLIP-declared slot is served alike.
    sub_configs_defaults = {"vision_config": SiglipVisionConfig}
    sub_configs = {"vision_config": SiglipVisionConfig}

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 22
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Shadows the base class's deprecated `rope_scaling` -> `rope_parameters` alias: here it is a plain field.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Qwen2: q/k/v carry a bias and so do the vision K/V projections; o_proj never has one.
    attention_bias: bool = False
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    vision_config: dict | SiglipVisionConfig | CLIPVisionConfig | None = None
    # d_v, the width of the raw vision features every layer's RMSNorm_v / W_K,v / W_V,v reads.
    vision_hidden_size: int | None = None
    # hidden_states index of the vision tower to use (penultimate layer; its first token is then dropped).
    vision_feature_layer: int = -2
    # Only used to strip `<image>` placeholder tokens from input_ids: HiMix's image never enters the sequence.
    image_token_index: int | None = None

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = SiglipVisionConfig()
        elif isinstance(self.vision_config, dict):
            fields = dict(self.vision_config)
            model_type = fields.pop("model_type", SiglipVisionConfig.model_type)
            if model_type not in VISION_CONFIGS:
                raise ValueError(f"vision_config.model_type={model_type!r} is not supported: "
                                 f"one of {sorted(VISION_CONFIGS)}")
            self.vision_config = VISION_CONFIGS[model_type](**fields)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.vision_hidden_size is None:
            self.vision_hidden_size = self.vision_config.hidden_size
        if self.vision_hidden_size != self.vision_config.hidden_size:
            raise ValueError(
                f"vision_hidden_size ({self.vision_hidden_size}) must equal vision_config.hidden_size "
                f"({self.vision_config.hidden_size}): the vision K/V projections read the tower's raw features"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ("default", "linear", "llama3"):
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3)")


__all__ = ["HiMixConfig"]
