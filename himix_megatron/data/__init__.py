"""Data: LLaVA-format inputs -> webdataset shards -> resumable per-rank micro-batches.

- records.py   conversation checks shared by the builder and the loader
- sources.py   JSON/JSONL/parquet readers, per-record validation for the builder
- shards.py    shard format: atomic tar + sidecar writing, offset/CRC-verified reading
- build.py     resumable, parallel shard building (CLI: tools/build_shards.py)
- tokenizer.py sentencepiece / tokenizer.json behind one interface, local files only
- templates.py the HiMix authors' templates (pretrain, tinyllama, llama-3, qwen2_base), token for token
- image.py     the tower's own preprocessing (image_config_for): SigLIP (bicubic resize, mean = std = 0.5) or
               CLIP (shortest edge, centre crop, OpenAI mean / std); optional pad-to-square
- sampler.py   the global sample order: epochs, blends, data-parallel split
- loader.py    the per-rank loader: workers, save/restore, bad-data accounting
- collate.py   megatron-style shifted tokens / labels / loss_mask batches
- synthetic.py a vision-dependent toy dataset for CPU demos and tests
- recipes.py   examples/recipes/*.yaml -> per-stage DatasetSpecs and hyperparameters
"""

from himix_megatron.data.build import BuildConfig, build_shards
from himix_megatron.data.collate import CollateConfig, Sample, collate
from himix_megatron.data.image import ImageConfig, preprocess
from himix_megatron.data.loader import DataLoaderAbort, DatasetSpec, LoaderConfig, SampleEncoder, ShardLoader
from himix_megatron.data.recipes import Stage, load_recipe, stage
from himix_megatron.data.records import Conversation, DataError, SampleError, parse_conversation
from himix_megatron.data.sampler import SampleOrder
from himix_megatron.data.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    TemplateConfig,
    encode_conversation,
    generation_prompt,
    check_tokenizer,
    has_target,
)
from himix_megatron.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BuildConfig", "build_shards", "CollateConfig", "Sample", "collate", "ImageConfig", "preprocess",
    "DataLoaderAbort", "DatasetSpec", "LoaderConfig", "SampleEncoder", "ShardLoader", "Conversation",
    "DataError", "SampleError", "parse_conversation", "SampleOrder", "IGNORE_INDEX", "IMAGE_TOKEN_INDEX",
    "TEMPLATES", "TemplateConfig", "encode_conversation", "generation_prompt", "has_target", "check_tokenizer",
    "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer", "Stage", "load_recipe", "stage",
]
