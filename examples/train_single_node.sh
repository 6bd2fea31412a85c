#!/usr/bin/env bash
# One machine: torchrun starts one trainer per GPU (or NPROC CPU processes with gloo). Run it with the
# package's environment active (e.g. PATH=.venv/bin:$PATH), or set PYTHON and TORCHRUN.
#
#   examples/train_single_node.sh                      # CPU demo: tiny HiMix, TP=2, synthetic data
#   NPROC=8 examples/train_single_node.sh --load CKPT --save CKPT --data-path SHARDS ... # any himix-train flags
#
# --save D --load D is restart-safe: the first start finds no checkpoint in D and begins at iteration 0,
# every later start resumes from D's latest checkpoint. MAX_RESTARTS > 0 lets torchrun restart the
# workers itself after a crash, and they resume the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
[ "${NPROC:-0}" -gt 0 ] || NPROC=2
MAX_RESTARTS=${MAX_RESTARTS:-0}
# A fresh rendezvous store per restart: torchrun's default store outlives the workers, and restarted
# workers would read the dead ones' addresses from it and fail to connect (pytorch/pytorch#167288).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

if [ $# -eq 0 ]; then
    DEMO=${DEMO:-/tmp/himix_demo}
    if [ ! -e "$DEMO/train/index.json" ]; then
        "${PYTHON:-python}" -m himix_megatron.data.synthetic --output "$DEMO/train" --tokenizer-dir "$DEMO/tok" \
            --num-samples 3000 >/dev/null
    fi
    # The word-level demo tokenizer knows only the synthetic data's words: no default system prompt.
    set -- --tensor-model-parallel-size 2 --data-path "$DEMO/train" --tokenizer-model "$DEMO/tok" \
        --system-prompt "" --seq-length 24 --micro-batch-size 32 --train-iters 200 --lr 3e-3 \
        --log-interval 20 --num-workers 1 --save "$DEMO/ckpt" --load "$DEMO/ckpt" --save-interval 100
fi
# On SIGTERM torchrun forwards the signal to its workers and SIGKILLs them after --shutdown-timeout (30 s by
# default). With --exit-signal-handler the workers finish their step and save first: give them that long.
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-900}
exec "${TORCHRUN:-torchrun}" --standalone --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" \
    --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
    -m himix_megatron.train "$@"
