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

# NGC sets PIP_CONSTRAINT=/etc/pip/constraint.txt, pinning what the image was built with. Its CUDA stack (torch,
# Transformer Engine, flash-attn, apex, numpy, nvidia-*) must stay; its pure-Python pins may predate what
# transformers>=5.6 needs (huggingface-hub, tokenizers), which would make the install unresolvable. So pip runs
# under the image's file less those pins (tools/ngc_constraints.py prints which it released). `gpu` names
# transformer-engine and flash-attn, which the kept pins hold at the image's builds.
# MPI: the image ships HPC-X Open MPI (mpirun, libmpi); the `mpi` extra's mpich from PyPI would put a second
# mpirun and libmpi beside it, and an mpi4py bound to one under the other's launcher sees every rank as rank 0.
# So no `mpi` extra here: mpi4py is built from source against the image's Open MPI (its mpicc), and srun /
# torchrun launches need no MPI at all (himix_megatron/platform.py).
RUN python tools/ngc_constraints.py /etc/pip/constraint.txt > /tmp/himix-constraint.txt \
    && PIP_CONSTRAINT=/tmp/himix-constraint.txt pip install --no-cache-dir -e '.[gpu]' \
    && (python -c "import mpi4py" 2>/dev/null || MPICC="$(command -v mpicc)" \
        PIP_CONSTRAINT=/tmp/himix-constraint.txt pip install --no-cache-dir --no-binary=mpi4py mpi4py)

# Fail the build, not the first job, if the GPU stack is not what the TE spec needs.
RUN python -c "import transformer_engine.pytorch, flash_attn, megatron.core, transformers, mpi4py; \
from importlib.metadata import version; from packaging.version import Version; \
te = Version(version('transformer_engine')); \
assert Version('2.9.0a0') <= te < Version('2.12.0'), f'transformer_engine {te} is outside megatron-core 0.16.1 range'; \
print('transformer_engine', te, 'flash_attn', version('flash_attn'), 'megatron-core', version('megatron-core'))"

ENV PYTHONUNBUFFERED=1
