# What one node of a training job runs: how many ranks, and on how many CPUs. Sourced by
# train.sbatch; tests/unit/test_slurm_ranks.py feeds it crafted Slurm environments.
# shellcheck shell=bash

# Ranks per node: MTRAIN_PROCS_PER_NODE when set, else one per GPU Slurm allocated on this node.
# A job given no GPU is refused (exit 2, one line) unless a CPU run was asked for
# (DS_ACCELERATOR=cpu, or MTRAIN_PROCS_PER_NODE): on a GPU cluster a submission without
# GPUs would otherwise train on one CPU rank with gloo, and say nothing.
ranks_per_node() {
  local asked=${MTRAIN_PROCS_PER_NODE:-} gpus=${SLURM_GPUS_ON_NODE:-0}
  [[ $gpus =~ ^[0-9]+$ ]] || gpus=0
  if [ -n "$asked" ]; then
    if ! [[ $asked =~ ^[1-9][0-9]*$ ]]; then
      echo "mtrain: MTRAIN_PROCS_PER_NODE=$asked: give the number of ranks per node (1 or more)" >&2
      return 2
    fi
    echo "$asked"
  elif [ "$gpus" -gt 0 ]; then
    echo "$gpus"
  elif [ "${DS_ACCELERATOR:-}" = cpu ]; then
    echo 1
  else
    echo "mtrain: job ${SLURM_JOB_ID:-?} has no GPU: submit it with --gpus-per-node=<GPUs>" \
      "(8 in train.sbatch's header), or for a CPU run set DS_ACCELERATOR=cpu" \
      "[MTRAIN_PROCS_PER_NODE=<ranks>] and pass --gpus-per-node=0 --cpus-per-task=<CPUs>" >&2
    return 2
  fi
}

# CPUs of the one launcher task per node (torchrun, its ranks and their loader workers): the
# job's --cpus-per-task, else every CPU the job holds on this node. srun must be told: since
# Slurm 22.05 a step does not inherit --cpus-per-task from sbatch (only from its own option or
# SRUN_CPUS_PER_TASK) and would get one CPU.
launcher_cpus() {
  echo "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"
}
