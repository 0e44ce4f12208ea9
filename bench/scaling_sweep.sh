#!/usr/bin/env bash
# The scaling-law benchmark on this machine: a depth x compute-budget grid of the `scaling`
# family as one Hydra multirun of the trainer (one process, Hydra's basic launcher, each point
# its own run directory under $SWEEP), then mtrain.scaling's fit, IsoFLOP minima and held-out
# check (the law fitted without the largest budget predicts that budget's best loss).
#
#   bench/scaling_sweep.sh                  # DATA=data/music21_all, SWEEP=runs/scaling
#   DATA=data/bach SWEEP=runs/scaling-bach bench/scaling_sweep.sh
#
# Running it again resumes every point where it stopped (finished points take a second). The
# budgets vary slowest: the smaller ones finish first.
# Width 16 per layer (ASPECT=16) instead of nanochat's 64: on two shared CPU cores the budgets
# are 1e11-3e12 FLOPs, whose compute-optimal sizes (about 30k-160k parameters at 20 tokens per
# parameter) lie below 64-wide depth 2 (461k with a 525-token vocabulary), where the 64-wide
# family has one size, depth 1 (83k).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/music21_all}
SWEEP=${SWEEP:-runs/scaling}
DEPTHS=${DEPTHS:-1,2,3,4,5}
ASPECT=${ASPECT:-16}
BUDGETS=${BUDGETS:-1e11,3e11,1e12,3e12}
# WANDB=disabled spares each point wandb's start-up (seconds on a loaded machine).
WANDB=${WANDB:-offline}
# One thread: on a machine shared with other jobs, two OpenMP threads wait on each other.
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

start=$(date +%s)
# The sweep's exit code says whether any point failed; the fit reports which and goes on.
nice -n "${NICE:-10}" "$PY" -m mtrain.train -m \
  data.path="$DATA" run_dir="$SWEEP" \
  trainer.flops_budget="$BUDGETS" model=scaling model.aspect_ratio="$ASPECT" model.depth="$DEPTHS" \
  deepspeed=cpu deepspeed.zero_stage=0 trainer.micro_batch_size=8 trainer.global_batch_tokens=2048 \
  optim.lr=2e-3 optim.warmup_fraction=0.05 \
  trainer.eval_every=100000 trainer.eval_batches=40 trainer.save_every=100000 \
  trainer.log_every=200 data.num_workers=0 logger.mode="$WANDB" || echo "some points failed (see above)"
echo "sweep: $(( $(date +%s) - start )) s"
"$PY" -m mtrain.scaling sweep_dir="$SWEEP" output="$SWEEP/law" logger.mode="$WANDB"
