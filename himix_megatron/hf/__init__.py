"""Hugging Face side of HiMix: `trust_remote_code` files copied verbatim into exported model directories.

`configuration_himix.py`, `modeling_himix.py` and `processing_himix.py` import only torch and transformers, so an
export directory is self-contained; they are not imported here so that importing this package stays cheap.
`modeling_llava_baselines.py` (FastV and gamma-MoD inference on transformers' LLaVA) is the remote code of the
vanilla exports that switch a baseline on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# The transformers releases the remote code and the exports are verified with: the oldest, which setup.py's lower
# bound names and CI installs (make test-hf-matrix reads it from here), to the newest that passed. Each export
# records it in config.json (`himix_tested_transformers`); docs/gpu-and-containers.md's "Install details" quotes
# it. Keep the form ">=OLDEST,<=NEWEST": the Makefile extracts OLDEST with sed.
TESTED_TRANSFORMERS = ">=5.6.0,<=5.25.0"
TESTED_TRANSFORMERS_KEY = "himix_tested_transformers"

REMOTE_CODE_FILES = ("configuration_himix.py", "modeling_himix.py", "processing_himix.py")
# AutoModel too: generic loaders (lmms-eval's `huggingface` model) fall back to AutoModel for a model type that
# transformers does not know, and need a model that generates. AutoProcessor is also in the export's
# processor_config.json, where AutoProcessor looks first.
AUTO_MAP = {
    "AutoConfig": "configuration_himix.HiMixConfig",
    "AutoModel": "modeling_himix.HiMixForCausalLM",
    "AutoModelForCausalLM": "modeling_himix.HiMixForCausalLM",
    "AutoProcessor": "processing_himix.HiMixProcessor",
}


def _copy_code(output_dir, files, auto_map: dict) -> dict:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copyfile(Path(__file__).parent / name, output_dir / name)
    return dict(auto_map)


def write_remote_code(output_dir) -> dict:
    """Copy the remote-code files into `output_dir`; return the `auto_map` entry for its config.json."""
    return _copy_code(output_dir, REMOTE_CODE_FILES, AUTO_MAP)


BASELINES_CODE_FILE = "modeling_llava_baselines.py"
# A model type of its own ("llava_baselines"): with "llava", every loader that does not trust remote code
# (LlavaForConditionalGeneration, AutoModelForImageTextToText, lmms-eval's llava_hf) would silently run the plain
# model; with it they refuse. AutoModel for generic harnesses, as above; AutoProcessor stays the LlavaProcessor.
BASELINES_AUTO_MAP = {
    "AutoConfig": "modeling_llava_baselines.LlavaBaselinesConfig",
    "AutoModel": "modeling_llava_baselines.LlavaBaselinesForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_llava_baselines.LlavaBaselinesForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_llava_baselines.LlavaBaselinesForConditionalGeneration",
}


def write_baselines_code(output_dir) -> dict:
    """Copy modeling_llava_baselines.py into `output_dir`; return the `auto_map` entry for its config.json."""
    return _copy_code(output_dir, (BASELINES_CODE_FILE,), BASELINES_AUTO_MAP)
