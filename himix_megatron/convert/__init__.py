"""Checkpoint conversion between Hugging Face and our megatron-core models, both ways.

- `layout`: configs and tensor names/shapes, megatron <-> HF, with no I/O (QKV interleaved per query
  group, SwiGLU [gate; up] sharded per TP rank, vocabulary padding, tied embeddings, Qwen2 qkv bias,
  HiMix's vision K/V).
- `hf_files`: reading HF model directories (safetensors or pytorch_model*.bin, with or without an index)
  lazily, tokenizer files, writing sharded safetensors with an index.
- `hf_import`: an HF Llama/Qwen2 decoder + SigLIP vision tower -> a megatron checkpoint at any TP/PP,
  written by that many ranks.
- `hf_export`: a megatron checkpoint of any TP/PP -> an HF directory (remote-code HiMix, or transformers'
  own LlavaForConditionalGeneration for the vanilla baseline).

The CLI is tools/convert_checkpoint.py.
"""

from himix_megatron.convert.layout import ConversionError

__all__ = ["ConversionError"]
