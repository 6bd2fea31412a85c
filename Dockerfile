# GPU image for cluster jobs. The NGC PyTorch container already ships CUDA torch, Transformer Engine,
# flash-attn and apex, built against each other; installing the package keeps them (setup.py asks
# for torch only as a range). Build: docker build -t himix-megatron .
# Run (pyxis/enroot on SLURM): srun --container-image=himix-megatron ... himix-train ...
#
# NGC PyTorch 25.11 is the container megatron-core 0.16.1's own CI runs on; its Transformer Engine falls in
# the range megatron-core 0.16.1's `dev` extra pins (>=2.9.0a0,<2.12.0). 25.04 predates megatron-core 0.16.1.
FROM nvcr.io/nvidia/pytorch:25.11-py3

WORKDIR /workspace/himix_megatron
COPY setup.py README.md ./
COPY himix_megatron ./himix_megatron
COPY tools ./tools
COPY examples ./examples

# `gpu` names transformer-engine and flash-attn, which the base image already satisfies; `mpi` adds
# mpi4py + mpich for mpirun launches. Never install these extras on a CPU-only machine.
RUN pip install --no-cache-dir -e '.[gpu,mpi]'

# Fail the build, not the first job, if the GPU stack is not what the TE spec needs.
RUN python -c "import transformer_engine.pytorch, flash_attn, megatron.core; \
from importlib.metadata import version; from packaging.version import Version; \
te = Version(version('transformer_engine')); \
assert Version('2.9.0a0') <= te < Version('2.12.0'), f'transformer_engine {te} is outside megatron-core 0.16.1 range'; \
print('transformer_engine', te, 'flash_attn', version('flash_attn'), 'megatron-core', version('megatron-core'))"

ENV PYTHONUNBUFFERED=1
