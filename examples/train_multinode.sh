#!/usr/bin/env bash
# Several machines with torchrun: run this same command on every node, e.g. through pdsh or by hand.
#
#   NNODES=4 RDZV_HOST=node001 examples/train_multinode.sh --tensor-model-parallel-size 2 ... # himix-train flags
#
# torchrun's c10d rendezvous waits for NNODES agents at RDZV_HOST:RDZV_PORT and numbers the nodes in
# the order they join, so no node rank is given: every node runs the identical command. The agent on
# RDZV_HOST hosts the rendezvous store; the trainers' own MASTER_ADDR / MASTER_PORT come from torchrun.
# With MAX_RESTARTS > 0, a crashed worker anywhere makes every agent restart its workers (a new
# rendezvous round), and with --save D --load D on a shared filesystem they resume from D's latest
# checkpoint. RUN_ID must differ between concurrent jobs that share a rendezvous host.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES to the number of machines}"
: "${RDZV_HOST:?set RDZV_HOST to a host every node can reach (typically the first node)}"
RDZV_PORT=${RDZV_PORT:-29400}
RUN_ID=${RUN_ID:-himix}
NPROC=${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
[ "${NPROC:-0}" -gt 0 ] || NPROC=1
MAX_RESTARTS=${MAX_RESTARTS:-3}
# A fresh rendezvous store per restart: torchrun's default store outlives the workers, and restarted
# workers would read the dead ones' addresses from it and fail to connect (pytorch/pytorch#167288).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# On SIGTERM torchrun forwards the signal to its workers and SIGKILLs them after --shutdown-timeout (30 s by
# default). With --exit-signal-handler the workers finish their step and save first: give them that long.
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-900}

exec "${TORCHRUN:-torchrun}" --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RUN_ID" \
    --max-restarts "$MAX_RESTARTS" --shutdown-timeout "$SHUTDOWN_TIMEOUT" -m himix_megatron.train "$@"
