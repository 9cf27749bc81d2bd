#!/usr/bin/env bash
# The multiple-choice evaluation table of docs/evaluation.md: SmolLM2 and Gemma-3-270M, plain / DoLa low /
# DoLa high / DoLa high with the premature norm / Activation Decoding (act) / Activation Decoding
# on DoLa high (act-high), on TruthfulQA MC (dev half) and EXPERT-FACTOR.
# Results are resumable JSON lines in benchmarks/eval_runs/; rerunning with a larger limit
# extends them. Usage: benchmarks/run_eval.sh TFQA_LIMIT FACTOR_LIMIT [MODEL...]
set -euo pipefail
cd "$(dirname "$0")/.."
TQ_LIMIT=${1:-409}
FA_LIMIT=${2:-236}
shift 2 || true
MODELS=${*:-smollm2 gemma3-270m}
# TASKS=tfqa-mc or TASKS=factor runs one chain (two chains can run side by side, 1 thread each);
# MODES picks rows (e.g. MODES="act act-high")
TASKS=${TASKS:-tfqa-mc factor}
MODES=${MODES:-plain low high high-norm act act-high}
# The data: TFQA_DEV, TruthfulQA.csv's dev half (its rows 0, 2, 4, ...: 409 questions; make it with
# benchmarks/eval_results.md's one-liner), and FACTOR_EXPERT, expert_factor.csv (default: the
# published file, `dola-cpp eval factor --subset expert` caches it)
TFQA=${TFQA_DEV:?set TFQA_DEV to the dev half of TruthfulQA.csv (see benchmarks/eval_results.md)}
FACTOR=${FACTOR_EXPERT:-$(python -c 'from dola_cpp import evaldata; print(evaldata.fetch("factor-expert"))')}
OUT=benchmarks/eval_runs
# EVAL_ENTRY: a script that runs the eval app (e.g. from a frozen copy of the package)
if [ -n "${EVAL_ENTRY:-}" ]; then
  EVAL=(nice -n 19 python "$EVAL_ENTRY")
else
  EVAL=(nice -n 19 python -c 'from dola_cpp.cli.eval import app; app(prog_name="dola-cpp eval")')
fi
for model in $MODELS; do
  for mode in $MODES; do
    case $mode in
      plain) opts=(--early-exit-layers=-1) ;;
      low) opts=(--layers low) ;;
      high) opts=(--layers high) ;;
      high-norm) opts=(--layers high --premature-norm) ;;
      act) opts=(--early-exit-layers=-1 --decoder activation) ;;
      act-high) opts=(--layers high --decoder activation) ;;
    esac
    for task in $TASKS; do
      if [ $task = tfqa-mc ]; then data=$TFQA; limit=$TQ_LIMIT; else data=$FACTOR; limit=$FA_LIMIT; fi
      echo "== $model $mode $task limit $limit $(date +%T)"
      "${EVAL[@]}" $task $model --data $data "${opts[@]}" --limit $limit --threads 1 \
        --json $OUT/$model.$mode.$task.jsonl >> $OUT/$model.$mode.$task.log 2>&1 || echo "FAILED"
      grep "^summary" $OUT/$model.$mode.$task.log | tail -1 || true
    done
  done
done
