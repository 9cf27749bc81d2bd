#!/usr/bin/env bash
# The layer sweeps (dola-cpp eval sweep): plain, --layers low/high and the DoLa paper's buckets
# on the validation half, the choice vs plain on the test half, for the demo models on
# TruthfulQA MC (the dev half, 409 questions) and EXPERT-FACTOR (236 examples). Resumable: each
# setting's run file is in benchmarks/sweeps/<model>.<task>/; rerunning continues.
# Usage: benchmarks/run_sweep.sh [MODEL...]   (TASKS=tfqa-mc or TASKS=factor runs one chain;
# THREADS=1 by default, so two chains can run side by side on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${*:-smollm2 gemma3-270m}
TASKS=${TASKS:-tfqa-mc factor}
THREADS=${THREADS:-1}
TFQA=../shared/data/truthfulqa/TruthfulQA_dev.csv  # the shared folder beside the checkout
FACTOR=../shared/data/factor/expert_factor.csv
OUT=benchmarks/sweeps
mkdir -p $OUT
for model in $MODELS; do
  for task in $TASKS; do
    if [ $task = tfqa-mc ]; then data=$TFQA; else data=$FACTOR; fi
    echo "== $model $task $(date +%T)"
    nice -n 19 python -m dola_cpp eval sweep $model --task $task --data $data --split 0.5 --threads $THREADS \
      --out $OUT/$model.$task >> $OUT/$model.$task.log 2>&1 || echo "FAILED (see $OUT/$model.$task.log)"
  done
done
