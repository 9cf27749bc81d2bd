"""Summarise benchmarks/eval_runs/*.jsonl (written by run_eval.sh) as markdown tables, computed
from the per-item run files (nothing retyped).

    python benchmarks/eval_table.py [benchmarks/eval_runs] [--ci N] [--overview] [--same-items]

By default: one table per task, each metric with its 95% percentile-bootstrap interval over the
items (dola_cpp.stats.bootstrap_ci, seed 0, N = 10,000 resamples) and each mode's paired
difference from plain decoding on the same items, with its interval and p-value (McNemar's exact
test for MC1 and FACTOR accuracy, the paired bootstrap for MC2 and MC3).

--overview prints the earlier one-table summary (with timings and layer usage) instead.
--same-items scores every row of a model on the items all its runs of that task have done (for
runs stopped early with --limit), so the rows compare like with like.
"""

import json
import sys
from pathlib import Path

import numpy as np

from dola_cpp import evaluate as ev
from dola_cpp import stats

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


def interval(iv):
    return f"{iv.value:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def difference(d):
    p = f"{d.p_value:.2g}" if d.p_value >= 1e-4 else "<1e-4"
    return f"{d.diff.value:+.3f} [{d.diff.low:+.3f}, {d.diff.high:+.3f}] (p {p})"


def runs_of(root, models, same_items):
    """(model, task) -> mode -> (header, records), records sorted by index."""
    out = {}
    for model in models:
        for task in (ev.TFQA, ev.FACTOR):
            found = {}
            for mode in MODES:
                p = root / f"{model}.{mode}.{task}.jsonl"
                if p.exists():
                    found[mode] = ev.read_run(p)
            if same_items and found:
                common = set.intersection(*({r["index"] for r in recs} for _, recs in found.values()))
                found = {m: (h, [r for r in recs if r["index"] in common]) for m, (h, recs) in found.items()}
            if found:
                out[model, task] = found
    return out


def layers_of(header):
    c = header["candidates"]
    if not c:
        return "—"
    shown = ",".join(map(str, c)) if len(c) <= 3 else f"{c[0]},{c[1]},…,{c[-1]}"
    return f"{shown} vs {header['mature']}"


def interval_tables(root, models, same_items, n_resamples):
    runs = runs_of(root, models, same_items)
    tfqa_metrics = [("MC1", lambda r: r["MC1"], True), ("MC3", lambda r: r["MC3"], False),
                    ("MC2 (repo)", lambda r: r["MC2"], False), ("MC2 stable", mc2_stable, False)]
    factor_metrics = [("accuracy", lambda r: float(r["correct"]), True)]
    for task, metrics, title in ((ev.TFQA, tfqa_metrics, "TruthfulQA MC"), (ev.FACTOR, factor_metrics, "FACTOR")):
        groups = [metrics[:2], metrics[2:]] if task == ev.TFQA else [metrics]
        for group in groups:
            names = ", ".join(g[0] for g in group)
            print(f"**{title}: {names}** (n items; 95% bootstrap intervals over the items, "
                  f"{n_resamples} resamples; Δ = mode − plain on the items both scored, "
                  f"{'McNemar' if group[0][2] else 'paired bootstrap'} p"
                  + (", paired bootstrap p for " + ", ".join(g[0] for g in group[1:]) if group[0][2] and len(group) > 1
                     else "") + ")\n")
            head = "| model | mode | layers | n | " + " | ".join(f"{g[0]} | Δ{g[0]} vs plain" for g in group) + " |"
            print(head)
            print("|" + "---|" * (4 + 2 * len(group)))
            for model in models:
                found = runs.get((model, task))
                if not found:
                    continue
                plain = found.get("plain")
                for mode, (header, recs) in found.items():
                    cells = [model, MODES[mode], layers_of(header), str(len(recs))]
                    for name, value, binary in group:
                        v = [value(r) for r in recs]
                        cells.append(interval(stats.bootstrap_ci(v, n_resamples, warn=False)))
                        if plain is None or mode == "plain":
                            cells.append("—")
                            continue
                        by = {r["index"]: r for r in plain[1]}
                        both = [r for r in recs if r["index"] in by]
                        a = [value(by[r["index"]]) for r in both]
                        b = [value(r) for r in both]
                        d = stats.compare(a, b, binary=binary, n_resamples=n_resamples, warn=False)
                        cells.append(difference(d))
                    print("| " + " | ".join(cells) + " |")
            print()


def main():
    argv = sys.argv[1:]
    n_resamples = stats.N_RESAMPLES
    if "--ci" in argv:
        i = argv.index("--ci")
        n_resamples = int(argv[i + 1])
        del argv[i:i + 2]
    args = [a for a in argv if not a.startswith("--")]
    same_items = "--same-items" in argv
    root = Path(args[0] if args else "benchmarks/eval_runs")
    models = sorted({p.name.split(".")[0] for p in root.glob("*.jsonl")}, key=lambda m: m != "smollm2")
    if "--overview" not in argv:
        interval_tables(root, models, same_items, n_resamples)
        return
    overview(root, models, same_items)


def overview(root, models, same_items):
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
