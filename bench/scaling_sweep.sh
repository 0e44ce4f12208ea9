#!/usr/bin/env bash
# The scaling-law benchmark on this machine: a depth x compute-budget grid of the `scaling`
# family, one Hydra multirun per depth (over the budgets: one process, Hydra's basic launcher,
# each point its own run directory under $SWEEP/d<depth>), then mtrain.scaling's fit, IsoFLOP
# minima and held-out check (the law fitted without the largest budget predicts that budget's
# best loss).
#
#   bench/scaling_sweep.sh                  # DATA=data/music21_all, SWEEP=runs/scaling
#   DEPTHS="2 4 6" bench/scaling_sweep.sh & DEPTHS="3 5" bench/scaling_sweep.sh   # two cores
#   DATA=data/bach SWEEP=runs/scaling-bach bench/scaling_sweep.sh
#   SEEDS="1 2" BUDGETS=1e13 DEPTHS=3 SWEEP=runs/scaling/seeds bench/scaling_sweep.sh  # repeats
#
# SEEDS: repeats of each point, each under its own seed (the model's initialisation and the data's
# order: trainer.seed and data.seed) in $SWEEP/d<depth>/seed<N>; the fit averages the runs of one
# size and budget into one point.
#
# One multirun per depth because each size gets its own learning rate: LR at width LR_WIDTH,
# scaled by the square root of LR_WIDTH / width (Adam's update per weight shrinks as the fan-in
# grows), as Chinchilla and nanochat tune one per size; one rate for all left the larger sizes
# of an earlier grid unstable (bench/README.md). Running it again resumes every point where it
# stopped (finished points take a second).
# Width 16 per layer (ASPECT=16) instead of nanochat's 64: on two CPU cores the budgets are
# 3e11-1e13 FLOPs, whose compute-optimal sizes (about 50k-300k parameters at 20 tokens per
# parameter) lie below 64-wide depth 2 (461k with a 525-token vocabulary).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/music21_all}
SWEEP=${SWEEP:-runs/scaling}
DEPTHS=${DEPTHS:-2 3 4 5 6}
ASPECT=${ASPECT:-16}
BUDGETS=${BUDGETS:-3e11,1e12,3e12,1e13}
LR=${LR:-1e-3}
LR_WIDTH=${LR_WIDTH:-128}
# 512 tokens a step (2 x 256): the larger sizes still take hundreds of steps at the smallest
# budget. 200 validation batches (102k tokens): the loss the law is fitted to, measured on
# enough music that two sizes a few percent apart are told apart.
BATCH=${BATCH:-512}
EVAL_BATCHES=${EVAL_BATCHES:-200}
# WANDB=disabled spares each point wandb's start-up (seconds on a loaded machine).
WANDB=${WANDB:-offline}
# One thread: two sweeps side by side use the two cores better than two threads each.
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

start=$(date +%s)
for depth in $DEPTHS; do
  lr=$("$PY" -c "print(f'{$LR * ($LR_WIDTH / ($ASPECT * $depth)) ** 0.5:.3g}')")
  echo "depth $depth: width $((ASPECT * depth)), lr $lr"
  for seed in ${SEEDS:-default}; do
    if [ "$seed" = default ]; then
      dir="$SWEEP/d$depth" seeding=()
    else
      dir="$SWEEP/d$depth/seed$seed" seeding=(trainer.seed="$seed" data.seed="$seed")
    fi
    # The sweep's exit code says whether any point failed; the fit reports which and goes on.
    nice -n "${NICE:-10}" "$PY" -m mtrain.train -m \
      data.path="$DATA" run_dir="$dir" \
      trainer.flops_budget="$BUDGETS" model=scaling model.aspect_ratio="$ASPECT" \
      model.depth="$depth" deepspeed=cpu deepspeed.zero_stage=0 \
      trainer.micro_batch_size=$((BATCH / 256)) trainer.global_batch_tokens="$BATCH" \
      optim.lr="$lr" optim.warmup_fraction=0.05 trainer.eval_every=100000000 \
      trainer.eval_batches="$EVAL_BATCHES" trainer.save_every=100000000 trainer.log_every=500 \
      data.num_workers=0 logger.mode="$WANDB" "${seeding[@]}" ||
      echo "some points of depth $depth failed (see above)"
  done
done
echo "sweep: $(( $(date +%s) - start )) s"
[ -n "${NO_FIT:-}" ] || "$PY" -m mtrain.scaling sweep_dir="$SWEEP" output="$SWEEP/law" \
  logger.mode="$WANDB"
