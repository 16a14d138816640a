#!/bin/bash
# Data-parallel `pmp pretrain` on several Slurm nodes: one torchrun launcher per node, one training process per
# GPU, c10d rendezvous on the first node of the allocation. See docs/distributed.md.
#
#   sbatch examples/slurm_pretrain.sh                                   # configs/small.yaml -> runs/<job name>
#   CONFIG=configs/my.yaml RUN=/shared/runs/my-pmp sbatch --nodes=4 examples/slurm_pretrain.sh
#
# RUN must be on a file system every node sees (rank 0 writes it, every rank reads the tokenizer, the initial
# weights and the checkpoints from it), and it is private: it holds the mask and the initial weights.
# Submitting the same script again (or a requeue after a node failure) resumes from the last complete checkpoint,
# at whatever number of nodes the new allocation has, as long as it divides the global batch.
#
#SBATCH --job-name=pmp-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

CONFIG=${CONFIG:-configs/small.yaml}
RUN=${RUN:-$PWD/runs/$SLURM_JOB_NAME}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

# A run that has started (config.yaml written) is continued, never restarted: its init secret is already drawn.
RESUME=()
if [[ -e "$RUN/config.yaml" ]]; then
    RESUME=(--resume)
fi

# Uncomment to use the project's environment on the compute nodes:
# source "$SLURM_SUBMIT_DIR/.venv/bin/activate"

export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE : 1 ))

# --kill-on-bad-exit: a node whose processes fail takes the whole job down (torchrun already stops the other
# processes of its own node when one of them dies); the checkpoints written so far stay valid.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$HEAD:$PORT" \
    --rdzv-id="$SLURM_JOB_ID" \
    -m pmp pretrain "$CONFIG" --out "$RUN" ${RESUME[@]+"${RESUME[@]}"}
