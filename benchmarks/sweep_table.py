"""The layer sweeps (benchmarks/run_sweep.sh, `dola-cpp eval sweep`) as markdown tables, from their
committed sweep.json files (nothing retyped).

    python benchmarks/sweep_table.py [benchmarks/sweeps]

One table per sweep: each setting's metric on the validation split with its 95% bootstrap
interval and its paired difference from plain there, then the chosen setting and plain on the
test split, and the sweep's verdict.
"""

import json
import sys
from pathlib import Path

from dola_cpp.sweep import verdict


def _iv(iv):
    return f"{iv['value']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def _p(d, n_resamples):
    p = d["p_value"]
    return f"p < {1 / n_resamples:.0e}" if p == 0 else f"p {p:.2g}"


def table(result: dict) -> str:
    metric, n_res = result["metric"], result["n_resamples"]
    n_val = next(s["validation"]["n"] for s in result["settings"])
    n_test = next(s["test"]["n"] for s in result["settings"] if s["test"])
    lines = [f"**{result['model']}, {result['task']}** ({result['n_items']} items: {n_val} validation, "
             f"{n_test} test; {metric}, 95% bootstrap intervals, {n_res} resamples; Δ = setting − plain on "
             f"the same items, {'McNemar' if metric in ('MC1', 'accuracy') else 'paired bootstrap'} p)", "",
             f"| setting | layers | validation {metric} | Δ vs plain (validation) | test {metric} |",
             "|---|---|---|---|---|"]
    for s in result["settings"]:
        cands = ", ".join(map(str, s["candidates"]))
        layers = f"{cands} vs {s['mature']}" if cands else "—"
        d = (s.get("validation_vs_plain") or {}).get(metric)
        delta = f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({_p(d, n_res)})" if d else "—"
        test = _iv(s["test"]["intervals"][metric]) if s["test"] else ""
        name = s["name"] + (" (chosen)" if s["name"] == result["chosen"] else "")
        lines.append(f"| {name} | {layers} | {_iv(s['validation']['intervals'][metric])} | {delta} | {test} |")
    lines += ["", f"Verdict: {verdict(result)}."]
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "sweeps")
    files = sorted(root.glob("*/sweep.json"))
    print("\n\n".join(table(json.loads(f.read_text())) for f in files))


if __name__ == "__main__":
    main()
