"""himix_megatron: HiMix vision-language models on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="himix_megatron",
    version="0.1.0",
    description="Megatron-style tensor/pipeline-parallel training of HiMix vision-language models",
    packages=find_packages(include=["himix_megatron", "himix_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A range, so that inside the NGC container pip keeps the container's CUDA build of torch.
        "torch>=2.4",
        # Exact: cpu_compat.py patches known sites of this release.
        "megatron-core==0.16.1",
        # 5.6 is the oldest release the tests pass with: from 5.6 on SiglipVisionModel holds its tensors
        # flat (`embeddings.*`, `encoder.*`); 5.0-5.5 nest them under `vision_model.`, which the SigLIP
        # import (model/vision.py) and the remote code's tower do not expect. The range verified in CI
        # is himix_megatron/hf's TESTED_TRANSFORMERS (make test-hf-matrix).
        "transformers>=5.6,<6",
        "safetensors",
        "sentencepiece>=0.2.2",  # encode(return_type="proto"): the piece offsets the label mask reads
        "tokenizers",
        "webdataset>=0.2.86",
        "pillow",
        "numpy",
        "pyyaml",
        "einops",
        "tqdm",
        "tensorboard",
        # dist_checkpointing's async writers log memory through psutil; without it they fail
        # before signalling completion and save() waits forever.
        "psutil",
        "pyarrow",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        "mpi": ["mpi4py", "mpich"],
        # --wandb-project (training/wandb_run.py). 0.26 is the first release that allows protobuf 7 (0.25.0 and
        # 0.22.0 ask for protobuf<7), which tensorboard pulls into the lock.
        "wandb": ["wandb>=0.26"],
        # GPU only. These ship in the NGC PyTorch container; never install them on a CPU machine
        # (transformer-engine fails to build there, and its core wheel alone breaks megatron imports).
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
    entry_points={"console_scripts": ["himix-train = himix_megatron.train:main",
                                    "himix-eval = himix_megatron.eval.cli:main"]},
)
