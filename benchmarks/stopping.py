"""Do answers end? Measured on TruthfulQA questions as `dola-cpp run` asks them
(the GGUF's chat template; a "User: ... / Assistant:" transcript ending at the next "User:" for a
model without one), greedy, 128-token budget; for plain, DoLa high and DoLa high
with the premature norm, each without and with eos_boost. Prints the share of answers that end
by themselves (an end-of-generation token, or the transcript's next turn) within the budget, the share that end before eos_boost
could act (80% of the budget), the share ending at a sentence end, and the mean length.

    python benchmarks/stopping.py [--models smollm2 gemma3-270m] [-n 50] [--boost 6]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dola_cpp import Model
from dola_cpp import evaluate as ev
from dola_cpp.config import EOS_BOOST_START
from dola_cpp.hub import resolve_model

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "truthfulqa" / "TruthfulQA_dev.csv"

MODES = {
    "plain": {},
    "DoLa high": {"layers": "high"},
    "DoLa high, premature norm": {"layers": "high", "premature_norm": True},
}


def sentence_end(text: str) -> bool:
    return text.rstrip().rstrip("\"')]*").endswith((".", "!", "?"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    ap.add_argument("-n", type=int, default=50, help="questions (the first n of the dev half)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--boost", type=float, default=6.0, help="the eos_boost of the boosted rows (nats)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    items = ev.load_truthfulqa(args.data)[: args.n]
    early = int(EOS_BOOST_START * args.max_tokens)
    rows = []
    for name in args.models:
        m = Model(resolve_model(name), n_ctx=1024, n_threads=args.threads)
        if m.chat_template_supported:
            prompts = [m.apply_chat_template([{"role": "user", "content": it.question}]) for it in items]
            stop = None
        else:  # the chat's transcript format
            prompts = [f"User: {it.question}\nAssistant:" for it in items]
            stop = ["\nUser:"]
        for mode, kw in MODES.items():
            for boost in (0.0, args.boost):
                t0 = time.perf_counter()
                results = [m.generate(p, max_tokens=args.max_tokens, eos_boost=boost, stop=stop, **kw) for p in prompts]
                ended = [r for r in results if r.finish_reason == "stop"]
                rows.append({
                    "model": m.path.name, "mode": mode, "eos_boost": boost, "n": len(results),
                    "ended": len(ended) / len(results),
                    "ended_early": sum(len(r.tokens) < early for r in ended) / len(results),
                    "sentence_end": sum(sentence_end(r.text) for r in ended) / len(results),
                    "mean_tokens": sum(len(r.tokens) for r in results) / len(results),
                    "seconds": round(time.perf_counter() - t0, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"| model | mode | eos_boost | ended by itself (≤{args.max_tokens}) | ended before {early} | "
          f"ended at a sentence end | mean tokens |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['eos_boost']:g} | {r['ended']:.0%} | {r['ended_early']:.0%} | "
              f"{r['sentence_end']:.0%} | {r['mean_tokens']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
