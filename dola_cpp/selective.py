"""Selective question answering: answer only when the risk is low, and measure what
that buys. Each TruthfulQA question's MC1 answer is the model's choice among the best answer and
the false ones; its risk signals are read off that answer's tokens (teacher-forced, exactly what a
generation of it would report per step). Ranking the questions by a signal and answering the
least risky share gives accuracy as a function of coverage; the area under that curve (mean
accuracy over coverages) compares the signals, and random ranking is the flat line at the overall
accuracy.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import evaluate as ev
from . import stats
from .evaluate import ScoreOptions, TruthfulQAItem
from .model import Model
from .risk import RISK_FORMULA, SIGNALS, signal_risks

PathLike = Union[str, os.PathLike]

SELECTIVE = "selective"


def score_selective(model: Model, item: TruthfulQAItem, opts: ScoreOptions) -> dict:
    """MC1 of one question plus the risk signals of the answer the model chooses."""
    prompt = ev.tfqa_prompt(item.question)
    choices = [item.best] + list(item.false)
    results = model.score_batch(
        prompt, [" " + a for a in choices], layers=opts.layers, relative_top=opts.relative_top,
        post_softmax=opts.post_softmax, premature_norm=opts.premature_norm,
        decoder=opts.decoder, alpha=opts.alpha, info_layer=opts.info_layer,
    )
    scores = [r.score for r in results]
    correct = scores[0] > max(scores[1:])  # MC1, strictly, as MC_calcs
    chosen = 0 if correct else 1 + int(np.argmax(scores[1:]))
    r = results[chosen]
    return {
        "index": item.index,
        "correct": bool(correct),
        "chosen": chosen,
        "scores": [float(s) for s in scores],
        "tokens": {
            "mature_logprob": _rounded(r.mature_logprobs),
            "top_logprob": _rounded(r.top_logprobs),
            "entropy": _rounded(r.entropies),
            "jsd": _rounded(r.jsd),
        },
        "layers": {str(k): v for k, v in sorted(_count(r.premature_layers).items())},
    }


def _rounded(a: np.ndarray) -> list[Optional[float]]:
    return [None if not math.isfinite(float(v)) else round(float(v), 5) for v in a]


def _count(layers: Sequence[Optional[int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for layer in layers:
        if layer is not None:
            out[layer] = out.get(layer, 0) + 1
    return out


TASK = ev.Task(
    SELECTIVE, ev.load_truthfulqa, score_selective, relative_top=0.0, post_softmax=False, metric="MC1",
    item_metric=lambda r: float(r["correct"]),
    summarize=lambda records: {"MC1": ev.mean_of(records, lambda r: float(r["correct"]))},
    item_values={"MC1": lambda r: float(r["correct"])}, binary=("MC1",),
)


# ---------------------------------------------------------------------------- curves


def question_risks(record: dict, n_vocab: int) -> dict[str, float]:
    """Each signal's risk for one scored question (the chosen answer's tokens)."""
    t = record["tokens"]

    def arr(name: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in t[name]], dtype=np.float64)

    risks = signal_risks(arr("mature_logprob"), arr("top_logprob"), arr("entropy"), arr("jsd"), n_vocab)
    scores = np.asarray(record["scores"], dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp(scores - scores.max())
        risks["choice_margin"] = float(1.0 - p[record["chosen"]] / p.sum())
    return risks


def coverage_curve(correct: Sequence[bool], risk: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of the ``k`` least risky questions for k = 1..n, as (coverage, accuracy). Ties in
    risk are averaged (a tied group's questions are answered in expectation)."""
    c = np.asarray(correct, dtype=np.float64)
    r = np.nan_to_num(np.asarray(risk, dtype=np.float64), nan=np.inf)
    n = len(c)
    order = np.argsort(r, kind="stable")
    c, r = c[order], r[order]
    # average correctness within groups of equal risk
    _, start, counts = np.unique(r, return_index=True, return_counts=True)
    for s, k in zip(start, counts):
        if k > 1:
            c[s:s + k] = c[s:s + k].mean()
    k = np.arange(1, n + 1)
    return k / n, np.cumsum(c) / k


def coverage_bands(correct: Sequence[bool], risk: Sequence[float], n_resamples: int = stats.N_RESAMPLES,
                   level: float = stats.LEVEL, seed: int = 0) -> tuple[np.ndarray, np.ndarray, stats.Interval]:
    """Bootstrap over questions of the accuracy-coverage curve: the ``level`` band of the accuracy
    at each of the n coverage points (low, high) and the interval of the area.

    Each resample draws n questions with replacement (``numpy.random.default_rng(seed)``, as
    :func:`dola_cpp.stats.resample_means`) and answers them least risky first, tied risks
    averaged as :func:`coverage_curve` does: with the questions of equal risk merged into groups,
    the correct answers among the first ``m`` answered are the cumulative count interpolated
    linearly inside a group."""
    c = np.asarray(correct, dtype=np.float64)
    r = np.nan_to_num(np.asarray(risk, dtype=np.float64), nan=np.inf)
    n = len(c)
    if n == 0:
        raise ValueError("coverage_bands: no questions")
    _, group = np.unique(r, return_inverse=True)  # groups in order of increasing risk
    n_groups = int(group.max()) + 1
    rng = np.random.default_rng(seed)
    m = np.arange(1, n + 1, dtype=np.float64)
    accs = np.empty((n_resamples, n))
    for start in range(0, n_resamples, 1_000):
        rows = min(1_000, n_resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        g = group[idx] + n_groups * np.arange(rows)[:, None]  # (resample, group) as one index
        weight = np.bincount(g.ravel(), minlength=rows * n_groups).reshape(rows, n_groups)
        right = np.bincount(g.ravel(), weights=c[idx].ravel(), minlength=rows * n_groups).reshape(rows, n_groups)
        cum_w = np.concatenate([np.zeros((rows, 1)), np.cumsum(weight, axis=1)], axis=1)
        cum_r = np.concatenate([np.zeros((rows, 1)), np.cumsum(right, axis=1)], axis=1)
        for i in range(rows):
            accs[start + i] = np.interp(m, cum_w[i], cum_r[i]) / m
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(accs, [tail, 1.0 - tail], axis=0)
    areas = accs.mean(axis=1)
    a_lo, a_hi = np.quantile(areas, [tail, 1.0 - tail])
    _, acc = coverage_curve(correct, risk)
    return low, high, stats.Interval(area(m / n, acc), float(a_lo), float(a_hi), level, n)


def area(coverage: np.ndarray, accuracy: np.ndarray) -> float:
    """Area under the accuracy-coverage curve: the mean accuracy over the n coverage points."""
    return float(np.mean(accuracy)) if len(accuracy) else float("nan")


@dataclass
class SelectiveCurves:
    mode: str  # "plain" or the DoLa layers' description
    n: int
    accuracy: float  # at full coverage (= MC1)
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # signal -> (coverage, accuracy)
    aucs: dict[str, float]
    # with n_resamples: signal -> (low, high) of the accuracy at each coverage, and the area's interval
    bands: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    auc_intervals: dict[str, stats.Interval] = field(default_factory=dict)
    accuracy_interval: Optional[stats.Interval] = None

    def as_dict(self) -> dict[str, Any]:
        def rounded(a: np.ndarray) -> list[float]:
            return [round(float(x), 5) for x in a]

        out = {
            "mode": self.mode,
            "n": self.n,
            "accuracy": self.accuracy,
            "auc": self.aucs,
            "curves": {s: {"coverage": rounded(cov), "accuracy": rounded(acc),
                           **({"low": rounded(self.bands[s][0]), "high": rounded(self.bands[s][1])}
                              if s in self.bands else {})}
                       for s, (cov, acc) in self.curves.items()},
        }
        if self.auc_intervals:
            out["auc_interval"] = {s: i.as_dict() for s, i in self.auc_intervals.items()}
        if self.accuracy_interval is not None:
            out["accuracy_interval"] = self.accuracy_interval.as_dict()
        return out


def curves(records: Sequence[dict], n_vocab: int, mode: str, signals: Sequence[str] = SIGNALS,
           n_resamples: int = 0, seed: int = 0) -> SelectiveCurves:
    """Each signal's accuracy-coverage curve and area; with ``n_resamples``, their bootstrap bands
    over questions (:func:`coverage_bands`) and MC1's interval."""
    correct = [bool(r["correct"]) for r in records]
    per_q = [question_risks(r, n_vocab) for r in records]
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in list(signals) + ["choice_margin"]:
        values = [q.get(s, float("nan")) for q in per_q]
        if all(math.isnan(v) for v in values):
            continue  # e.g. JSD without dynamic DoLa
        out[s] = coverage_curve(correct, values)
    acc = float(np.mean(correct)) if correct else float("nan")
    n = len(correct)
    out["random"] = (np.arange(1, n + 1) / n, np.full(n, acc))
    result = SelectiveCurves(mode, n, acc, out, {s: area(*cv) for s, cv in out.items()})
    if n_resamples > 0 and n:
        for s in out:
            values = [0.0] * n if s == "random" else [q.get(s, float("nan")) for q in per_q]
            low, high, auc = coverage_bands(correct, values, n_resamples, seed=seed)
            result.bands[s] = (low, high)
            result.auc_intervals[s] = auc
        result.accuracy_interval = stats.bootstrap_ci([float(x) for x in correct], n_resamples, seed=seed, warn=False)
    return result


def write_json(path: PathLike, model_name: str, results: Sequence[SelectiveCurves]) -> None:
    Path(path).write_text(json.dumps({"model": model_name, "modes": [r.as_dict() for r in results]}, indent=1) + "\n")


def plot(path: PathLike, model_name: str, results: Sequence[SelectiveCurves]) -> None:
    """Accuracy vs coverage, one panel per mode, one line per signal (AUC in the legend)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the plot needs matplotlib: pip install 'dola-cpp[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False, sharey=True)
    for ax, res in zip(axes[0], results):
        for s, (cov, acc) in res.curves.items():
            style = {"color": "0.5", "linestyle": "--"} if s == "random" else {}
            width = 2.4 if s == "risk" else 1.3
            name = f"risk = {RISK_FORMULA}" if s == "risk" else s
            interval = res.auc_intervals.get(s)
            auc = f"AUC {res.aucs[s]:.3f}" + (f" [{interval.low:.3f}, {interval.high:.3f}]" if interval else "")
            line = ax.plot(cov, acc, label=f"{name} ({auc})", linewidth=width, **style)[0]
            if s in res.bands:
                ax.fill_between(cov, res.bands[s][0], res.bands[s][1], color=line.get_color(), alpha=0.12, linewidth=0)
        ax.set_title(f"{model_name}: {res.mode} (n={res.n}, MC1 {res.accuracy:.3f})", fontsize=9)
        ax.set_xlabel("coverage (share of questions answered)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("MC1 accuracy of the answered questions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
