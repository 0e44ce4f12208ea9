#!/usr/bin/env bash
# Submits a sliced preparation: N array tasks, then the merge once all have succeeded.
#   slurm/prepare.sh 8 source=s3://corpus/midi output=s3://datasets/midi-v1 [overrides...]
# Extra sbatch options go in SBATCH_ARGS (e.g. SBATCH_ARGS="--partition=cpu --cpus-per-task=16").
# A task's one collector process (writing shards) keeps up with ~15 workers: on wider nodes
# run more tasks of at most 16 CPUs rather than one task per node.
set -euo pipefail
slices=${1:?usage: prepare.sh NUM_SLICES output=... [overrides]}
shift
output=""
for arg in "$@"; do
  case $arg in output=*) output=$arg ;; esac
done
[ -n "$output" ] || { echo "prepare.sh: give output=<dir or URL>" >&2; exit 2; }
here=$(dirname "$0")
# shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
array=$(sbatch --parsable ${SBATCH_ARGS:-} --array=0-$((slices - 1)) "$here/prepare.sbatch" "$@")
# shellcheck disable=SC2086
merge=$(sbatch --parsable ${SBATCH_ARGS:-} --dependency=afterok:"$array" "$here/merge.sbatch" "$output")
echo "prepare array job $array ($slices slices), merge job $merge"
