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
# The data: TFQA_DEV, TruthfulQA.csv's dev half (its rows 0, 2, 4, ...: 409 questions; make it with
# benchmarks/eval_results.md's one-liner), and FACTOR_EXPERT, expert_factor.csv (default: the
# published file, `dola-cpp eval factor --subset expert` caches it)
TFQA=${TFQA_DEV:?set TFQA_DEV to the dev half of TruthfulQA.csv (see benchmarks/eval_results.md)}
FACTOR=${FACTOR_EXPERT:-$(python -c 'from dola_cpp import evaldata; print(evaldata.fetch("factor-expert"))')}
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
