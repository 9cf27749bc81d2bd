"""Summarise benchmarks/eval_runs/*.jsonl (written by run_eval.sh) as the README's markdown table.

    python benchmarks/eval_table.py [benchmarks/eval_runs] [--same-items]

--same-items scores every row of a model on the items all its runs of that task have done (for
runs stopped early with --limit), so the rows compare like with like.
"""

import json
import sys
from pathlib import Path

import numpy as np

from dola_cpp import evaluate as ev

MODES = {"plain": "plain", "low": "DoLa low", "high": "DoLa high", "high-norm": "DoLa high, premature norm",
         "act": "Activation", "act-high": "Activation on DoLa high"}


def mc2_stable(rec):
    """MC2 with the softmax computed stably (max subtracted): what MC_calcs means when exp() overflows."""
    t, f = np.asarray(rec["scores_true"]), np.asarray(rec["scores_false"])
    top = max(t.max(), f.max())
    pt, pf = np.exp(t - top).sum(), np.exp(f - top).sum()
    return float(pt / (pt + pf))


def load(path):
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines[0], [r for r in lines[1:] if r.get("type") == "result"]


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    same_items = "--same-items" in sys.argv[1:]
    root = Path(args[0] if args else "benchmarks/eval_runs")
    models = sorted({p.name.split(".")[0] for p in root.glob("*.jsonl")}, key=lambda m: m != "smollm2")
    common = {}  # (model, task) -> the item indices every run of it has
    for p in root.glob("*.jsonl"):
        model, _, task = p.name[: -len(".jsonl")].split(".")
        done = {r["index"] for r in load(p)[1]}
        common[model, task] = common.get((model, task), done) & done
    print("| model | mode | layers | MC1 | MC2 | MC2 stable | MC3 | FACTOR acc | TruthfulQA q / time | FACTOR ex. / time |"
          " most used premature layer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in models:
        for mode, label in MODES.items():
            row = {}
            for task in (ev.TFQA, ev.FACTOR):
                p = root / f"{model}.{mode}.{task}.jsonl"
                if p.exists():
                    header, recs = load(p)
                    if same_items:
                        recs = [r for r in recs if r["index"] in common[model, task]]
                    metrics = ev.get_task(task).summarize(recs)
                    hist = ev.layer_histogram(recs, header["candidates"])
                    row[task] = (header, recs, metrics, hist)
            if not row:
                continue
            header = next(iter(row.values()))[0]
            layers = "—" if not header["candidates"] else f"{header['candidates']} vs {header['mature']}"
            cells = [model, label, layers]
            if ev.TFQA in row:
                _, recs, m, _ = row[ev.TFQA]
                nan = f" ({m['MC2_nan']}/{len(recs)} overflow→0)" if m["MC2_nan"] else ""
                stable = sum(mc2_stable(r) for r in recs) / len(recs)
                cells += [f"{m['MC1']:.3f}", f"{m['MC2']:.3f}{nan}", f"{stable:.3f}", f"{m['MC3']:.3f}"]
            else:
                cells += ["", "", "", ""]
            cells.append(f"{row[ev.FACTOR][2]['accuracy']:.3f}" if ev.FACTOR in row else "")
            for task in (ev.TFQA, ev.FACTOR):
                if task in row:
                    recs = row[task][1]
                    cells.append(f"{len(recs)} / {sum(r['seconds'] for r in recs):.0f} s")
                else:
                    cells.append("")
            hist = {}
            for task in row:
                for k, v in row[task][3].items():
                    hist[k] = hist.get(k, 0) + v
            total = sum(hist.values())
            if total:
                top = max(hist, key=hist.get)
                cells.append(f"{top} ({100 * hist[top] / total:.0f}% of {total} tokens)")
            else:
                cells.append("—")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
