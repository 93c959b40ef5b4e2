#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task per node, all local GPUs per task.
#   sbatch --nodes=8 launch/slurm.sh --config configs/sd21_depth.py --workdir /shared/run --config.base=/shared/sd21
#SBATCH --job-name=jointnet
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
set -euo pipefail
# jax.distributed.initialize() reads SLURM_* to find the coordinator, process count and index.
srun python -m jointnet_jax.train "$@"
