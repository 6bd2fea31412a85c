# Shared by the sbatch scripts in this directory; they source it (sbatch runs a spooled copy of the
# script, so it is found through the submit directory: submit from the repository root).
#
# Settings, from the environment (all required but MOUNTS, CONTAINER_REPO and GPUS_PER_NODE):
#   IMAGE       enroot squashfs (or docker://...) of the Dockerfile's image. A .sqsh made once with
#               `enroot import -o himix-megatron.sqsh dockerd://himix-megatron` starts in seconds; a
#               registry image is re-imported by every srun step.
#   HIMIX_DATA  holds shards/ as built in examples/recipes/README.md
#   RUNS        checkpoints, stage configs and TensorBoard logs, one directory per run
#   HF_LLM      Hugging Face decoder directory (Vicuna / Llama / Qwen2 / TinyLlama)
#   HF_VISION   Hugging Face SigLIP directory (google/siglip-so400m-patch14-384)
#   MOUNTS      pyxis --container-mounts; by default the four paths above at the same paths inside,
#               so that this script (outside the container) and the trainer (inside) agree on them.
#   CONTAINER_REPO  the repository inside the image (default: the Dockerfile's WORKDIR)
#   GPUS_PER_NODE   tasks per node in the training steps (default 8)
# shellcheck shell=bash

: "${IMAGE:?set IMAGE to the himix-megatron container image (see examples/slurm/common.sh)}"
: "${HIMIX_DATA:?set HIMIX_DATA to the directory holding shards/}"
: "${RUNS:?set RUNS to a directory on a filesystem shared by all nodes}"
: "${HF_LLM:?set HF_LLM to the Hugging Face language model directory}"
: "${HF_VISION:?set HF_VISION to the Hugging Face SigLIP directory}"
MOUNTS=${MOUNTS:-"$HIMIX_DATA:$HIMIX_DATA:ro,$RUNS:$RUNS,$HF_LLM:$HF_LLM:ro,$HF_VISION:$HF_VISION:ro"}
CONTAINER_REPO=${CONTAINER_REPO:-/workspace/himix_megatron}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# platform.discover_launch, SLURM branch: rank = SLURM_PROCID, world = SLURM_NTASKS, device =
# SLURM_LOCALID, rendezvous at MASTER_ADDR:MASTER_PORT. Exported here so that the batch host's
# resolution of the node list (scontrol, which knows every hostlist syntax) is the one used; the
# job-id-derived port keeps two jobs that share a node apart.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
# A RANK / WORLD_SIZE left in the environment would make the trainer take the torchrun branch.
unset RANK WORLD_SIZE LOCAL_RANK

mkdir -p "$RUNS"

# Without the home directory mounted, ~/.local packages cannot shadow the image's.
himix_srun() {
    srun --container-image="$IMAGE" --container-mounts="$MOUNTS" --container-workdir="$CONTAINER_REPO" \
        --no-container-mount-home "$@"
}

# import_weights OUTPUT TP PP: the HF decoder + SigLIP as a himix checkpoint at the training layout.
# The import writes OUTPUT.tmp-<pid> and renames it when complete, so `latest` means a whole import.
import_weights() {
    local output=$1 tp=$2 pp=$3
    if [ -e "$output/latest" ]; then
        echo "import: $output exists"
        return
    fi
    himix_srun --nodes=1 --ntasks=1 python tools/convert_checkpoint.py import \
        --hf-llm "$HF_LLM" --hf-vision "$HF_VISION" --arch himix \
        --tensor-model-parallel-size "$tp" --pipeline-model-parallel-size "$pp" --output "$output"
}

# train_stage RECIPE STAGE MODEL PREVIOUS SAVE [himix-train flags...]
# Restart-safe: run the same job again (or let SLURM requeue it) and every finished stage is skipped,
# the interrupted one resumes from its latest checkpoint (weights, optimizer, LR schedule, data
# position, RNG), and later stages start from the stage before them.
train_stage() {
    local recipe=$1 stage=$2 model=$3 previous=$4 save=$5
    shift 5
    if [ -e "$save/DONE" ]; then
        echo "stage $stage: finished earlier ($save/DONE)"
        return
    fi
    mkdir -p "$save"
    # The recipe (data, LR, batch, epochs) as a --config file; the flags below add the cluster layout.
    himix_srun --nodes=1 --ntasks=1 python examples/slurm/stage_config.py --recipe "$recipe" \
        --stage-name "$stage" --data-root "$HIMIX_DATA/shards" --language-model "$model" --output "$save/stage.yaml"
    # The previous stage's checkpoint has another --stage, so the trainer takes its weights only and
    # starts at iteration 0; once this stage has saved, its own checkpoint resumes it.
    local load=$previous
    if [ -e "$save/latest" ]; then
        load=$save
    fi
    # One task per GPU. Every task sees all of its node's GPUs and picks SLURM_LOCALID: do not add
    # --gpus-per-task / --gpu-bind, which would leave each task a single device 0.
    # --kill-on-bad-exit: one dead rank ends the step now instead of after the collective timeout.
    # --exit-signal-handler: SLURM's warning signal (#SBATCH --signal=TERM@LEAD in the job scripts) makes every
    # rank finish its step, save and exit 0. himix-train writes $save/DONE only when the stage's whole
    # schedule ran, so a stop before that requeues the job, which then resumes from that checkpoint.
    himix_srun --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 \
        himix-train --config "$save/stage.yaml" --load "$load" --save "$save" \
        --tensorboard-dir "$save/tensorboard" --no-progress --exit-signal-handler "$@"
    if [ ! -e "$save/DONE" ]; then
        echo "stage $stage: stopped before the end of its schedule; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
}
