# Site settings that every mtrain sbatch script sources: adapt this one file to a cluster.
# shellcheck shell=bash

# Modules and the Python environment (a venv made by the README's install line by default).
# module load cuda/12.8 nccl
MTRAIN_ROOT=${MTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
MTRAIN_PYTHON=${MTRAIN_PYTHON:-$MTRAIN_ROOT/.venv/bin/python}
export PYTHONUNBUFFERED=1

# Caches on a file system every node sees: the built-in corpus converted to MIDI, wandb files.
export MTRAIN_CACHE=${MTRAIN_CACHE:-$HOME/.cache/mtrain}
export WANDB_MODE=${WANDB_MODE:-offline}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# A CPU partition: export DS_ACCELERATOR=cpu here (and MTRAIN_PROCS_PER_NODE=<ranks per node>),
# or before sbatch. Nothing guesses it from the node: train.sbatch refuses a job without GPUs
# unless a CPU run was asked for, and mtrain uses the CPU (gloo) where torch sees no GPU.

# NCCL: InfiniBand on by default; set NCCL_IB_DISABLE=1 (and NCCL_SOCKET_IFNAME=<iface>) on
# Ethernet-only clusters. NCCL_DEBUG=INFO when a collective hangs.
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A hung collective fails after this many seconds instead of holding the allocation.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
