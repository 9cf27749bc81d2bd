"""How fast the answers of a TruthfulQA question are scored, three ways, in one run:

- ``batch``: ``Model.score_batch`` per question, what ``dola-cpp eval`` runs: the prompt decoded
  once, the answers side by side in the same llama.cpp calls, as sequences of their own on the
  prompt's cached cells;
- ``one by one``: ``Model.score`` per answer with the prompt's KV cache reused between answers
  (each answer its own llama.cpp calls; what ``dola-cpp eval`` ran before ``score_batch``);
- ``from scratch``: ``Model.score`` per answer with the KV cache emptied before each (``--scratch``).

Prints seconds per question and the largest score difference from ``one by one``, for plain
scoring and DoLa-high (raw premature layers, the repo's setting). ``--dtype F32`` converts the
model to F32 first (exact mode: F32 weights and KV cache, as the parity tests run).

    python benchmarks/bench_score.py --data TruthfulQA_dev.csv [--questions 10] [--model smollm2]
        [--dtype F32] [--threads N] [--kv-type f32] [--scratch] [--repeats 2]
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np

import dola_cpp
from dola_cpp import evaluate as ev
from dola_cpp.hub import cache_dir


def one_by_one(model, items, layers, scratch):
    scores = []
    for item in items:
        prompt = ev.tfqa_prompt(item.question)
        for answer in item.true + item.false:
            if scratch:
                model.clear_cache()
            scores.append(model.score(prompt, " " + answer, layers=layers).score)
    return scores


def batch(model, items, layers):
    scores = []
    for item in items:
        answers = [" " + a for a in item.true + item.false]
        scores += [r.score for r in model.score_batch(ev.tfqa_prompt(item.question), answers, layers=layers)]
    return scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="a demo model name or a .gguf path")
    ap.add_argument("--data", default=os.environ.get("TFQA_DEV"), required="TFQA_DEV" not in os.environ,
                    help="a TruthfulQA CSV (default: $TFQA_DEV; benchmarks/eval_results.md makes the dev half)")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--dtype", default=None, help="convert the model to this type first (F32, F16, Q8_0)")
    ap.add_argument("--threads", type=int, default=None, help="default: all cores, as dola-cpp eval")
    ap.add_argument("--kv-type", default="f32", help="f32 (dola-cpp eval's default) or f16")
    ap.add_argument("--scratch", action="store_true", help="also time one by one from an empty cache")
    ap.add_argument("--repeats", type=int, default=2, help="alternated rounds; each column keeps its best")
    args = ap.parse_args()
    path = dola_cpp.resolve_model(args.model)
    if args.dtype:
        out = cache_dir() / "converted" / f"{Path(path).stem}.{args.dtype}.gguf"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            dola_cpp.convert_model(path, out, args.dtype)
        path = out
    model = dola_cpp.Model(path, n_threads=args.threads, kv_type=args.kv_type)
    items = ev.load_truthfulqa(args.data)[: args.questions]
    n_answers = sum(len(i.true) + len(i.false) for i in items)
    print(f"{Path(path).name}, {len(items)} questions, {n_answers} answers, {model.n_threads} thread(s), "
          f"{args.kv_type} KV cache, best of {args.repeats} alternated rounds")
    batch(model, items[:1], None)  # warm up
    ways = {"batch": lambda layers: batch(model, items, layers),
            "one by one": lambda layers: one_by_one(model, items, layers, False)}
    if args.scratch:
        ways["from scratch"] = lambda layers: one_by_one(model, items, layers, True)
    print("| layers | " + " | ".join(f"{w} s/question" for w in ways) + " | batch speed-up | max score diff |")
    print("|---|" + "---:|" * (len(ways) + 2))
    for layers in (None, "high"):
        best = {w: float("inf") for w in ways}
        scores = {}
        for _ in range(args.repeats):
            for w, run in ways.items():
                t0 = time.perf_counter()
                scores[w] = np.asarray(run(layers))
                best[w] = min(best[w], time.perf_counter() - t0)
        diff = max(float(np.max(np.abs(s - scores["one by one"]))) for s in scores.values())
        cells = " | ".join(f"{best[w] / len(items):.3f}" for w in ways)
        print(f"| {layers or 'plain'} | {cells} | {best['one by one'] / best['batch']:.2f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
