"""How much the prefix KV-cache reuse of ``Model.score`` saves on TruthfulQA MC: the answers of a
question are scored one after another after the same 6-shot prompt, which is decoded once;
``--scratch`` empties the KV cache before every answer instead.

    python benchmarks/score_reuse.py [--questions 10] [--threads 1] [--model smollm2] [--kv-type f16]
"""

import argparse
import os
import time

import numpy as np

import dola_cpp
from dola_cpp import evaluate as ev


def run(model, items, layers, scratch):
    scores = []
    t0 = time.perf_counter()
    for item in items:
        prompt = ev.tfqa_prompt(item.question)
        for answer in item.true + item.false:
            if scratch:
                model.clear_cache()
            scores.append(model.score(prompt, " " + answer, layers=layers).score)
    return time.perf_counter() - t0, np.array(scores)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=os.environ.get("TFQA_DEV"), required="TFQA_DEV" not in os.environ,
                    help="a TruthfulQA CSV (default: $TFQA_DEV; benchmarks/eval_results.md makes the dev half)")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-type", default="f16", help="f16 (the Model default) or f32 (exact mode)")
    args = ap.parse_args()
    model = dola_cpp.Model(dola_cpp.resolve_model(args.model), n_threads=args.threads, kv_type=args.kv_type)
    items = ev.load_truthfulqa(args.data)[: args.questions]
    n_answers = sum(len(i.true) + len(i.false) for i in items)
    print(f"{model.path.name}, {len(items)} questions, {n_answers} answers, {args.threads} thread(s), {args.kv_type} KV cache")
    run(model, items[:1], None, False)  # warm up
    for layers in (None, "high"):
        t_reuse, s_reuse = run(model, items, layers, scratch=False)
        t_scratch, s_scratch = run(model, items, layers, scratch=True)
        print(
            f"layers={layers or 'plain'}: reuse {t_reuse:.2f} s ({t_reuse / len(items):.3f} s/question), "
            f"from scratch {t_scratch:.2f} s ({t_scratch / len(items):.3f} s/question), "
            f"speed-up {t_scratch / t_reuse:.2f}x, max |score diff| {np.max(np.abs(s_reuse - s_scratch)):.2e}"
        )


if __name__ == "__main__":
    main()
