# GPU image for cluster jobs. The NGC PyTorch container already ships CUDA torch, Transformer Engine,
# flash-attn and apex, built against each other; installing the package keeps them (setup.py asks
# for torch only as a range). Build: docker build -t himix-megatron .
# Run (pyxis/enroot on SLURM): srun --container-image=himix-megatron ... himix-train ...
FROM nvcr.io/nvidia/pytorch:25.04-py3

WORKDIR /workspace/himix_megatron
COPY setup.py README.md ./
COPY himix_megatron ./himix_megatron
COPY tools ./tools
COPY examples ./examples

# `gpu` names transformer-engine and flash-attn, which the base image already satisfies; `mpi` adds
# mpi4py + mpich for mpirun launches. Never install these extras on a CPU-only machine.
RUN pip install --no-cache-dir -e '.[gpu,mpi]'

ENV PYTHONUNBUFFERED=1
