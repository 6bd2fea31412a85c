"""The pip constraints the Dockerfile installs under: NGC's own, less the pins that are not its CUDA stack.

    python tools/ngc_constraints.py /etc/pip/constraint.txt > /tmp/himix-constraint.txt

NGC PyTorch images (25.03 on) set PIP_CONSTRAINT=/etc/pip/constraint.txt, which pins the packages the image was
built with, so that a `pip install` cannot replace its CUDA build of torch, Transformer Engine, flash-attn or
apex. The same file may pin pure-Python packages too (tokenizers, huggingface-hub, packaging, ...), and those
pins can make this package's requirements unresolvable: transformers>=5.6 needs a huggingface-hub and a
tokenizers newer than an image built before it. So the Dockerfile installs under this file instead: every pin
of the compiled stack kept (`STACK`: what pip must never rebuild or swap), every other pin dropped and named on
stderr. Lines that are not plain `name==version` pins (comments, options, URLs) pass through unchanged.
"""

from __future__ import annotations

import argparse
import re
import sys

# Distributions built against the image's CUDA / PyTorch ABI (names normalised as in PEP 503). numpy stays
# pinned because the image's compiled extensions are built against its ABI.
STACK = (
    "torch", "torchvision", "torchaudio", "triton", "pytorch-triton", "nvfuser", "numpy",
    "transformer-engine", "transformer-engine-cu12", "transformer-engine-cu13", "transformer-engine-torch",
    "flash-attn", "flash-attn-3", "apex", "cudnn", "tensorrt", "torch-tensorrt", "modelopt", "nvidia-modelopt",
    "nvidia-modelopt-core", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "cupy-cuda12x", "cupy-cuda13x",
    "mpi4py",
)
STACK_PREFIXES = ("nvidia-cudnn", "nvidia-cublas", "nvidia-nccl", "nvidia-cuda", "cuda-", "nvidia-nvjpeg",
                  "nvidia-nvimgcodec", "nvidia-nvcomp", "nvidia-cufft", "nvidia-curand", "nvidia-cusolver",
                  "nvidia-cusparse", "nvidia-nvtx", "nvidia-nvjitlink")
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*==")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_stack(name: str) -> bool:
    name = normalise(name)
    return name in STACK or name.startswith(STACK_PREFIXES)


def filter_constraints(text: str) -> tuple[str, list[str]]:
    """(the constraints to install under, the pins dropped)."""
    kept, dropped = [], []
    for line in text.splitlines():
        pin = PIN.match(line)
        if pin and not is_stack(pin.group(1)):
            dropped.append(line.strip())
            continue
        kept.append(line)
    return "\n".join(kept) + ("\n" if kept else ""), dropped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("constraint", help="the image's constraint file (NGC: /etc/pip/constraint.txt)")
    args = p.parse_args(argv)
    try:
        text = open(args.constraint, encoding="utf-8").read()
    except FileNotFoundError:
        text = ""  # an image without one (before 25.03): nothing to keep
    kept, dropped = filter_constraints(text)
    sys.stdout.write(kept)
    print(f"ngc_constraints: kept {sum(bool(PIN.match(x)) for x in kept.splitlines())} pins of the CUDA stack; "
          f"released {len(dropped)}: {', '.join(dropped) or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
