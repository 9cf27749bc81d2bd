"""Does DoLa help this model? The DoLa paper's way of choosing the premature layers: score plain
decoding, transformers' ``low`` and ``high`` sets and the paper's buckets of candidate layers on
a validation split, take the best, and check it against plain decoding on the test split (held
out from the choice), with bootstrap intervals and a paired test.

- **Buckets**: contiguous ranges of about N/4 layers (boundaries at multiples of ``round(N/4)``,
  the first starting where transformers' candidates start: 2 for a model with tied embeddings,
  else 0; the last ending at N-1), each contributing its even layers, against the final layer N
  -- the paper's scheme of contiguous buckets of even layers ([0,16), [16,32) for 32-layer
  LLaMA-7B; buckets of 20 layers for the larger models), at a finer grain for small models. Give
  the paper's own with ``--buckets 0-15,16-31``.
- **Split**: the items (after ``limit``) in the order of
  ``numpy.random.default_rng(seed).permutation(n)``; the first ``round(fraction * n)`` are the
  validation split, the rest the test split. For TruthfulQA ``fraction=0.5`` gives two halves;
  for FACTOR it is the share used to choose.
- **Choice**: the highest validation value of the sweep's metric (MC1 for TruthfulQA, whose MC2
  overflows with raw DoLa scores; accuracy for FACTOR); ties go to the earlier setting, plain
  first.

Each setting's per-item records are a results file of :func:`dola_cpp.evaluate.run_eval` in
the output folder (``<setting>.jsonl``, both splits in one file), so an interrupted sweep resumes
without rescoring an item. The result is ``sweep.json`` there (and ``sweep.png``, the plot), and
a copy in the cache, ``<cache>/sweeps/<model sha256>.json`` by task, that ``dola-cpp info``
reads.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from . import evaluate as ev
from . import stats
from .hub import cache_dir, sha256_of
from .layers import start_layer
from .model import Model

PathLike = Union[str, os.PathLike]
# progress(event, setting, count): "plan" (count more items to score), "start" (a setting's
# split begins: count items to score in it), "item" (one item scored)
SweepProgress = Callable[[str, str, int], None]

VALIDATION, TEST = "validation", "test"
SWEEP_JSON, SWEEP_PNG = "sweep.json", "sweep.png"


class SweepError(ValueError):
    """Bad sweep input (buckets, split, metric): one line for the user."""


@dataclass(frozen=True)
class SweepSetting:
    """One decode the sweep scores: its name (and run file's), what ``--layers`` takes for it,
    its candidates against the mature layer."""

    name: str
    layers: str  # the --layers value: "none", "low", "high" or "c1,c2,...,mature"
    candidates: tuple[int, ...]
    mature: int

    @property
    def spec(self) -> Optional[str]:
        return None if self.layers == "none" else self.layers

    def as_dict(self) -> dict:
        return {"name": self.name, "layers": self.layers, "candidates": list(self.candidates), "mature": self.mature}


# ---------------------------------------------------------------------------- buckets


def default_buckets(n_layers: int, tied_embeddings: bool) -> list[tuple[int, int]]:
    """The paper's buckets for an N-layer model: inclusive ranges of about N/4 layers."""
    width = max(2, int(round(n_layers / 4)))
    first = start_layer(n_layers, tied_embeddings)
    out = []
    for lo in range(0, n_layers, width):
        lo2, hi = max(lo, first), min(lo + width, n_layers) - 1
        if lo2 <= hi and bucket_candidates(lo2, hi):
            out.append((lo2, hi))
    return out


def bucket_candidates(lo: int, hi: int) -> list[int]:
    """The even layers of the inclusive range ``lo..hi``."""
    return [j for j in range(lo, hi + 1) if j % 2 == 0]


def parse_buckets(text: str, n_layers: int) -> list[tuple[int, int]]:
    """``"0-7,8-15"`` (inclusive ranges; ``"8"`` = ``"8-8"``) checked against the model: premature
    layers are 0..N-1, the ranges may not overlap, and each needs an even layer."""
    out: list[tuple[int, int]] = []
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise SweepError(f"--buckets {text!r}: give ranges of layers such as 0-7,8-15")
    for p in parts:
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", p)
        if not m:
            raise SweepError(f"--buckets: {p!r} is not a range of layers such as 8-15")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if lo > hi:
            raise SweepError(f"--buckets: {p!r} ends before it starts")
        if hi >= n_layers:
            raise SweepError(f"--buckets: layer {hi} is out of range: premature layers are 0..{n_layers - 1} "
                             f"for this {n_layers}-layer model (layer {n_layers} is the mature one)")
        if not bucket_candidates(lo, hi):
            raise SweepError(f"--buckets: {p!r} has no even layer (a bucket contributes its even layers)")
        for a, b in out:
            if lo <= b and a <= hi:
                raise SweepError(f"--buckets: {a}-{b} and {lo}-{hi} overlap")
        out.append((lo, hi))
    return out


def sweep_settings(n_layers: int, tied_embeddings: bool, buckets: Sequence[tuple[int, int]],
                   named: Callable[[str], Sequence[int]]) -> list[SweepSetting]:
    """Plain, ``low``, ``high`` (``named(name)`` gives their candidates) and one per bucket."""
    out = [SweepSetting("plain", "none", (), n_layers)]
    for name in ("low", "high"):
        out.append(SweepSetting(name, name, tuple(named(name)), n_layers))
    for lo, hi in buckets:
        cands = tuple(bucket_candidates(lo, hi))
        out.append(SweepSetting(f"bucket-{lo}-{hi}", ",".join(map(str, cands + (n_layers,))), cands, n_layers))
    return out


# ---------------------------------------------------------------------------- split


def split_items(items: Sequence, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(validation, test): the items in the order of ``default_rng(seed).permutation(n)``, the
    first ``round(fraction * n)`` for validation; each split in the items' own order."""
    n = len(items)
    if not 0.0 < fraction < 1.0:
        raise SweepError(f"--split must be a fraction in (0, 1), got {fraction:g}")
    k = int(round(fraction * n))
    if k == 0 or k == n:
        empty = "validation" if k == 0 else "test"
        raise SweepError(f"--split {fraction:g} of {n} item{'s' if n != 1 else ''} leaves the {empty} split empty; "
                         "use more items or another --split")
    order = np.random.default_rng(seed).permutation(n)
    chosen = set(int(i) for i in order[:k])
    return [it for i, it in enumerate(items) if i in chosen], [it for i, it in enumerate(items) if i not in chosen]


# ---------------------------------------------------------------------------- the sweep


def default_metric(task: ev.Task) -> str:
    return task.metric


def check_metric(task: ev.Task, metric: Optional[str]) -> str:
    metric = metric or default_metric(task)
    if metric not in task.item_values:
        raise SweepError(f"--metric {metric}: {task.name} reports {', '.join(task.item_values)}")
    return metric


def run_path(out_dir: PathLike, setting: SweepSetting) -> Path:
    return Path(out_dir) / f"{setting.name}.jsonl"


def done_indices(path: Path) -> set[int]:
    """The item indices a run file holds (none when it does not exist)."""
    if not path.exists() or path.stat().st_size == 0:
        return set()
    return {r["index"] for r in ev.read_run(path)[1]}


def _seconds_per_item(records: Sequence[dict]) -> Optional[float]:
    secs = [r["seconds"] for r in records if "seconds" in r]
    return round(float(np.mean(secs)), 4) if secs else None


def run_sweep(task: Union[str, ev.Task], model: Model, items: Sequence, out_dir: PathLike, *,
              fraction: float = 0.5, seed: int = 0, buckets: Optional[Sequence[tuple[int, int]]] = None,
              metric: Optional[str] = None, n_resamples: int = stats.N_RESAMPLES,
              header_extra: Optional[dict] = None, progress: Optional[SweepProgress] = None,
              model_sha256: Optional[str] = None) -> dict[str, Any]:
    """The sweep (see the module's docstring) of ``items``; writes the run files and ``sweep.json``
    into ``out_dir`` and returns its content. ``n_resamples=0``: no intervals (the choice and the
    paired test's point difference only)."""
    t = ev.get_task(task)
    metric = check_metric(t, metric)
    val, test = split_items(items, fraction, seed)
    if buckets is None:
        buckets = default_buckets(model.n_layers, model.tied_embeddings)
    settings = sweep_settings(model.n_layers, model.tied_embeddings, buckets,
                              lambda name: model.resolve_layers(name).candidates)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def todo(setting: SweepSetting, split: Sequence) -> int:
        done = done_indices(run_path(out, setting))
        return sum(1 for it in split if it.index not in done)

    def evaluate(stage: str, setting: SweepSetting, split: Sequence) -> ev.EvalSummary:
        if progress:
            progress("start", setting.name, todo(setting, split))

        def item(done: int, total: int, rec: dict) -> None:
            if rec and progress:
                progress("item", setting.name, 1)

        return ev.run_eval(t, model, split, layers=setting.spec, results_path=run_path(out, setting),
                           progress=item, header_extra=header_extra)

    def summary(s: ev.EvalSummary) -> dict:
        ints = ev.intervals(t, s.records, n_resamples, seed, warn=False)
        return {"n": s.n, "scored": s.n - s.resumed, "metrics": {k: v for k, v in t.summarize(s.records).items()},
                "intervals": {k: v.as_dict() for k, v in ints.items()},
                "seconds_per_item": _seconds_per_item(s.records)}

    if progress:
        progress("plan", "", sum(todo(s, val) for s in settings))
    val_runs = {s.name: evaluate(VALIDATION, s, val) for s in settings}
    plain = settings[0]
    scores = {s.name: ev.mean_of(val_runs[s.name].records, t.item_values[metric]) for s in settings}
    best = max(scores.values())
    chosen = next(s for s in settings if scores[s.name] == best)  # ties: the earlier, plain first

    test_settings = [plain] + ([chosen] if chosen is not plain else [])
    if progress:
        progress("plan", "", sum(todo(s, test) for s in test_settings))
    test_runs = {s.name: evaluate(TEST, s, test) for s in test_settings}

    def vs_plain(runs: dict[str, ev.EvalSummary], name: str) -> dict:
        _, diffs = ev.compare_records(t, runs[plain.name].records, runs[name].records,
                                      max(n_resamples, 1), seed, warn=False)
        out_d = {}
        for k, d in diffs.items():
            out_d[k] = d.as_dict() if n_resamples > 0 else {"value": d.diff.value, "p_value": d.p_value, "test": d.test}
        return out_d

    rows = []
    for s in settings:
        row = {**s.as_dict(), VALIDATION: summary(val_runs[s.name]),
               "validation_vs_plain": vs_plain(val_runs, s.name) if s is not plain else None,
               TEST: summary(test_runs[s.name]) if s.name in test_runs else None}
        rows.append(row)
    diff = vs_plain(test_runs, chosen.name)
    head = diff[metric]
    distinguishable = bool(n_resamples > 0 and head.get("distinguishable", False)) and chosen is not plain
    result = {
        "model": model.path.name,
        "sha256": model_sha256,
        "task": t.name,
        "metric": metric,
        "data": (header_extra or {}).get("data"),
        "n_items": len(items),
        "split": {"fraction": fraction, "seed": seed, "rule": "numpy.random.default_rng(seed).permutation(n)[:round(fraction*n)] validates",
                  VALIDATION: [it.index for it in val], TEST: [it.index for it in test]},
        "buckets": [list(b) for b in buckets],
        "n_resamples": n_resamples,
        "settings": rows,
        "chosen": chosen.name,
        "recommendation": {
            "setting": chosen.name,
            "layers": chosen.layers,
            "metric": metric,
            "validation": scores[chosen.name],
            "test": t.summarize(test_runs[chosen.name].records)[metric],
            "test_plain": t.summarize(test_runs[plain.name].records)[metric],
            "test_difference": head,
            "distinguishable": distinguishable,
        },
        "test_difference": diff,
        "out": str(out),  # as given: a committed sweep.json names no machine's folders
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / SWEEP_JSON).write_text(json.dumps(result, indent=1) + "\n")
    return result


def verdict(result: dict) -> str:
    """One sentence: what to use, and whether its test gain over plain is distinguishable from 0."""
    rec = result["recommendation"]
    metric, d = rec["metric"], rec["test_difference"]
    if rec["setting"] == "plain":
        return f"plain decoding scored best on the validation split ({metric} {rec['validation']:.3f}): use --layers none"
    p = d.get("p_value")
    p_shown = f"< {1 / max(result.get('n_resamples') or 1, 1):.0e}" if p == 0 else f"= {p:.3g}"
    ci = f" [{d['low']:+.3f}, {d['high']:+.3f}]" if "low" in d else ""
    sure = ("distinguishable from zero" if rec["distinguishable"] else "not distinguishable from zero")
    return (f"use --layers {rec['layers']} ({rec['setting']}): test {metric} {rec['test']:.3f} vs plain "
            f"{rec['test_plain']:.3f}, difference {d['value']:+.3f}{ci}, {d.get('test', '')} p {p_shown}: {sure}")


# ---------------------------------------------------------------------------- the cache (dola-cpp info)


def sweeps_dir() -> Path:
    return cache_dir() / "sweeps"


def model_sha256(path: PathLike) -> str:
    """The model file's SHA-256, remembered by path, size and modification time in
    ``<cache>/sweeps/files.json`` so a large file is hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    memo_path = sweeps_dir() / "files.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    key = [st.st_size, st.st_mtime_ns]
    hit = memo.get(str(p))
    if isinstance(hit, dict) and hit.get("stat") == key and hit.get("sha256"):
        return hit["sha256"]
    digest = sha256_of(p)
    memo[str(p)] = {"stat": key, "sha256": digest}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        memo_path.write_text(json.dumps(memo, indent=1) + "\n")
    except OSError:
        pass
    return digest


def cache_result(result: dict) -> Optional[Path]:
    """Keep ``result``'s recommendation as the model's last sweep of its task (by the file's
    SHA-256); returns the cache file (None when the result has no digest or it cannot be written)."""
    if not result.get("sha256"):
        return None
    path = sweeps_dir() / f"{result['sha256']}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    entry = {k: result[k] for k in ("model", "task", "metric", "data", "n_items", "recommendation", "out", "created")}
    entry["out"] = str(Path(result["out"]).resolve())  # the cache is this machine's: where to look
    entry["verdict"] = verdict(result)
    data.setdefault("sweeps", {})[result["task"]] = entry
    data["sha256"] = result["sha256"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
    except OSError:
        return None
    return path


def cached(path: PathLike) -> dict[str, dict]:
    """The last sweep of each task for the model file at ``path`` (task -> entry), if cached."""
    folder = sweeps_dir()
    if not folder.is_dir() or not any(p.name != "files.json" for p in folder.glob("*.json")):
        return {}  # nothing to look up: the file is not hashed
    try:
        data = json.loads((folder / f"{model_sha256(path)}.json").read_text())
    except (OSError, ValueError):
        return {}
    sweeps = data.get("sweeps")
    return sweeps if isinstance(sweeps, dict) else {}


# ---------------------------------------------------------------------------- the plot


def plot(path: PathLike, result: dict) -> None:
    """The metric per setting with its interval, validation and test side by side."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the plot needs matplotlib: pip install 'dola-cpp[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, rows = result["metric"], result["settings"]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(rows) + 1.5), 4.2))
    x = np.arange(len(rows))
    for offset, split, color in ((-0.15, VALIDATION, "tab:blue"), (0.15, TEST, "tab:orange")):
        xs, ys, lo, hi = [], [], [], []
        for i, row in enumerate(rows):
            s = row[split]
            if not s:
                continue
            v = s["metrics"][metric]
            iv = s["intervals"].get(metric)
            xs.append(i + offset)
            ys.append(v)
            lo.append(v - iv["low"] if iv else 0.0)
            hi.append(iv["high"] - v if iv else 0.0)
        n = len(result["split"][split])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=color, capsize=3, label=f"{split} ({n} items)")
    plain_val = rows[0][VALIDATION]["metrics"][metric]
    ax.axhline(plain_val, color="0.6", linestyle="--", linewidth=0.8)
    labels = [r["name"] + (" *" if r["name"] == result["chosen"] else "") for r in rows]
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (95% bootstrap interval)")
    ax.set_title(f"{result['model']}: {result['task']} sweep (* = chosen on validation)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
