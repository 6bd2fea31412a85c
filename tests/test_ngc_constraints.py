"""The Dockerfile's pip constraints (issue 25 item 7): NGC's /etc/pip/constraint.txt less its non-stack pins.

The image's real file could not be obtained here (no registry access to nvcr.io); the text below is written in
its format (`name==version` lines, the image's local versions) with the pins that matter: the CUDA stack, which
must survive, and pure-Python pins older than transformers>=5.6 allows, which must go."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from packaging.requirements import Requirement

TOOL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "ngc_constraints.py")

IMAGE_STYLE = """\
# pins of the image build
torch==2.10.0a0+b4e4ee81d3.nv25.11
torchvision==0.25.0a0+ee3d0a5b
triton==3.5.0
numpy==1.26.4
transformer_engine==2.9.0+70f53666
transformer_engine_cu12==2.9.0+70f53666
flash_attn==2.7.4.post1
apex==0.1
nvidia-cudnn-frontend==1.15.0
nvidia-modelopt==0.37.0
huggingface-hub==0.34.4
tokenizers==0.21.4
packaging==23.2
PyYAML==6.0.2
--extra-index-url https://example.invalid/simple
"""


def _tool():
    spec = importlib.util.spec_from_file_location("ngc_constraints", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cuda_stack_stays_pinned_and_the_rest_is_released():
    kept, dropped = _tool().filter_constraints(IMAGE_STYLE)
    names = {Requirement(line).name.lower().replace("_", "-") for line in kept.splitlines() if "==" in line}
    assert names == {"torch", "torchvision", "triton", "numpy", "transformer-engine", "transformer-engine-cu12",
                     "flash-attn", "apex", "nvidia-cudnn-frontend", "nvidia-modelopt"}
    assert dropped == ["huggingface-hub==0.34.4", "tokenizers==0.21.4", "packaging==23.2", "PyYAML==6.0.2"]
    assert "--extra-index-url https://example.invalid/simple" in kept.splitlines()  # options pass through


def test_the_kept_pins_satisfy_this_package_and_megatron_core():
    """Every kept pin of a package this project (or megatron-core 0.16.1) asks for meets its specifier, so the
    released pins are the only ones that could have conflicted."""
    from importlib.metadata import requires

    kept, _ = _tool().filter_constraints(IMAGE_STYLE)
    pins = {Requirement(line).name.lower().replace("_", "-"): str(Requirement(line).specifier)[2:]
            for line in kept.splitlines() if "==" in line}
    asked = [Requirement(r) for r in (requires("himix_megatron") or []) + (requires("megatron-core") or [])]
    checked = 0
    for req in asked:
        name = req.name.lower().replace("_", "-")
        if name in pins and (req.marker is None or req.marker.evaluate({"extra": "gpu"})):
            assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
            checked += 1
    assert checked >= 2  # torch and numpy at least


def test_the_script_writes_the_constraints_and_names_what_it_released(tmp_path):
    path = tmp_path / "constraint.txt"
    path.write_text(IMAGE_STYLE)
    proc = subprocess.run([sys.executable, TOOL, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "torch==2.10.0a0+b4e4ee81d3.nv25.11" in proc.stdout and "tokenizers" not in proc.stdout
    assert "kept 10 pins of the CUDA stack; released 4: huggingface-hub==0.34.4" in proc.stderr
    missing = subprocess.run([sys.executable, TOOL, str(tmp_path / "none.txt")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 0 and missing.stdout == ""  # an image without the file: no constraints
