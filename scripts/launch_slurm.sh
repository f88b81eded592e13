#!/usr/bin/env bash
# Multi-host training under SLURM: one process per node (all its GPUs) or one per GPU.
#
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 scripts/launch_slurm.sh \
#       --config=configs/gpu_1b.py --workdir=/shared/runs/gpu_1b --config.data.path='/shared/data/*.jsonl'
#
#   # one process per GPU instead:
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 scripts/launch_slurm.sh ...
#
# srun starts the same command on every task; JAX reads SLURM's environment (job id, task
# count, node list) to find the coordinator (--distributed=auto). With one task per node a process
# uses every GPU of its node; with one per GPU, the GPU of its local rank (--local_device_ids
# overrides both). WORKDIR must be on a filesystem every node sees (checkpoints are written
# by all processes together). VENV (default .venv) is activated first when it exists.
#SBATCH --job-name=switchyard
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
set -euo pipefail
VENV=${VENV:-.venv}
if [[ -f "$VENV/bin/activate" ]]; then source "$VENV/bin/activate"; fi
exec srun --kill-on-bad-exit=1 --label moe-train --distributed=auto "$@"
