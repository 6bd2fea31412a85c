#!/usr/bin/env bash
# mpirun: MPI only starts the processes and tells each its rank (PMI_RANK / OMPI_COMM_WORLD_RANK /
# PMIX_RANK); rank 0 picks a free port and broadcasts its host and port through mpi4py, and the
# training itself runs on NCCL (gloo on CPU). Needs the `mpi` extra (pip install -e '.[mpi]').
#
#   examples/train_mpirun.sh --tensor-model-parallel-size 2 ...                   # this machine, NP ranks
#   NP=16 PPN=8 HOSTS=node001,node002 examples/train_mpirun.sh ...                 # two machines
#
# Flags are MPICH/Hydra's (the `mpi` extra's mpirun). Open MPI: mpirun -np 16 --npernode 8 --host
# node001:8,node002:8 himix-train ...  Set MASTER_ADDR to override rank 0's hostname as the rendezvous
# address (e.g. to pick a network). There is no automatic restart: rerun the command, and
# --save D --load D resumes from D's latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
MPIRUN=${MPIRUN:-mpirun}
HOST_ARGS=()
if [ -n "${HOSTS:-}" ]; then
    HOST_ARGS=(-hosts "$HOSTS" -ppn "${PPN:?set PPN, the ranks per host}")
fi
# OMP_NUM_THREADS: mpirun, unlike torchrun, does not lower it, and every rank would spawn one thread
# per core.
exec "$MPIRUN" -np "$NP" "${HOST_ARGS[@]}" -genv OMP_NUM_THREADS "${OMP_NUM_THREADS:-1}" "${HIMIX_TRAIN:-himix-train}" "$@"
