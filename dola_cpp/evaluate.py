"""Multiple-choice evaluations with the DoLa repository's protocol (voidism/DoLa).

- **TruthfulQA MC** (``tfqa_mc_eval.py``): the 6-shot instruction prompt, each reference answer
  scored as ``" " + answer`` after ``"...Q: <question>\\nA:"`` with ``relative_top=0`` and no
  post-softmax; MC1/MC2/MC3 exactly as the repo's ``MC_calcs`` (ties and overflow included).
- **FACTOR** (``factor_eval.py``): the true completion and its three contradictions, each scored
  as ``" " + completion`` after the (truncated) prefix with ``relative_top=0.1`` and
  post-softmax; correct unless a contradiction scores strictly higher.

Results are appended as JSON lines (one header line with the run's settings, then one line per
item) so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from . import stats
from .config import DecodeConfig
from .evalitems import (  # noqa: F401 (re-exported: the items and their files are part of this module's API)
    FACTOR, FACTOR_COLUMNS, TFQA, TFQA_COLUMNS, TFQA_INSTRUCTION, TFQA_SHOTS, EvalDataError, FactorItem,
    PathLike, TruthfulQAItem, format_best, load_factor, load_truthfulqa, split_multi_answer, tfqa_primer, tfqa_prompt,
)
from .layers import LayerSpec, parse_layer_string
from .model import Model
from .settings import default

Progress = Callable[[int, int, dict], None]

def mc_calcs(
    scores_true: Sequence[float], scores_false: Sequence[float], ref_true: Sequence[str], ref_best: str
) -> dict[str, float]:
    """MC1/MC2/MC3 of one question, as the DoLa repo's ``MC_calcs`` (itself TruthfulQA's).

    MC1: the best answer beats every false one (strictly). MC3: the fraction of true answers that
    beat every false one (strictly). MC2: the probability mass of the true answers among all,
    ``exp`` of the raw scores; all-zero masses are rescued by halving that side's scores, a
    NaN (from overflow) counts as 0.
    """
    if not scores_true or not scores_false:
        raise ValueError("mc_calcs needs at least one true and one false score")
    max_false = max(scores_false)
    mc1 = 1.0 if scores_true[list(ref_true).index(ref_best)] > max_false else 0.0
    mc3 = float(np.sum(np.asarray(scores_true, dtype=np.float64) > max_false)) / len(scores_true)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        st = np.asarray(scores_true, dtype=np.float64)
        probs_true = np.exp(st)
        while probs_true.sum() == 0 and np.isfinite(st).any():
            st = st / 2.0
            probs_true = np.exp(st)
        sf = np.asarray(scores_false, dtype=np.float64)
        probs_false = np.exp(sf)
        while probs_false.sum() == 0 and np.isfinite(sf).any():
            sf = sf / 2.0
            probs_false = np.exp(sf)
        mass = float((probs_true / (probs_true.sum() + probs_false.sum())).sum())
    nan = math.isnan(mass)
    return {"MC1": mc1, "MC2": 0.0 if nan else mass, "MC3": mc3, "MC2_nan": nan}


def factor_correct(score_true: float, scores_false: Iterable[float]) -> bool:
    """The repo's rule: correct unless some contradiction scores strictly higher (ties count)."""
    return not any(score_true < s for s in scores_false)


# ---------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ScoreOptions:
    """How one answer is scored (the arguments of the repo's ``lm_score``)."""

    layers: LayerSpec = None
    relative_top: float = 0.0
    post_softmax: bool = False
    premature_norm: bool = False
    relative_top_value: float = -1000.0
    decoder: str = "dola"  # "activation": minus alpha * H[token] (Activation Decoding's lm_score)
    alpha: float = default("alpha")
    info_layer: Optional[int] = None


def early_exit_layers(spec: str) -> LayerSpec:
    """The repo's ``--early-exit-layers``: one value (e.g. the default ``-1``) = plain scoring
    from the final layer, whatever the value; two = static; more = dynamic."""
    parsed = parse_layer_string(spec)
    if isinstance(parsed, str):
        raise ValueError(f"--early-exit-layers takes comma-separated layer numbers, got {spec!r}")
    return None if len(parsed) == 1 else ",".join(str(v) for v in parsed)


def _scores(model: Model, prefix: str, continuations: list[str], opts: ScoreOptions, hist: Counter) -> list[float]:
    """The scores of ``continuations`` after ``prefix``, side by side in one batch (the prefix's
    cache shared), each as the repo's ``lm_score`` computes it."""
    rs = model.score_batch(
        prefix,
        continuations,
        layers=opts.layers,
        relative_top=opts.relative_top,
        post_softmax=opts.post_softmax,
        premature_norm=opts.premature_norm,
        relative_top_value=opts.relative_top_value,
        decoder=opts.decoder,
        alpha=opts.alpha,
        info_layer=opts.info_layer,
    )
    for r in rs:
        hist.update(layer for layer in r.premature_layers if layer is not None)
    return [r.score for r in rs]


def score_truthfulqa(model: Model, item: TruthfulQAItem, opts: ScoreOptions) -> dict:
    """Score one question's answers (true ones first, then false ones, side by side after the same
    prompt, which is decoded once) and compute its MC metrics."""
    prompt = tfqa_prompt(item.question)
    hist: Counter = Counter()
    scores = _scores(model, prompt, [" " + a for a in item.true + item.false], opts, hist)
    scores_true, scores_false = scores[: len(item.true)], scores[len(item.true):]
    metrics = mc_calcs(scores_true, scores_false, item.true, item.best)
    return {
        "index": item.index,
        **metrics,
        "scores_true": scores_true,
        "scores_false": scores_false,
        "layers": {str(k): v for k, v in sorted(hist.items())},
    }


def score_factor(model: Model, item: FactorItem, opts: ScoreOptions) -> dict:
    hist: Counter = Counter()
    score_true, *scores_false = _scores(
        model, item.prefix, [" " + c for c in (item.completion, *item.contradictions)], opts, hist
    )
    return {
        "index": item.index,
        "correct": factor_correct(score_true, scores_false),
        "score_true": score_true,
        "scores_false": scores_false,
        "layers": {str(k): v for k, v in sorted(hist.items())},
    }


# ---------------------------------------------------------------------------- runs


@dataclass
class EvalSummary:
    task: str
    n: int  # items evaluated (including ones resumed from the results file)
    metrics: dict[str, float]  # MC1/MC2/MC3 (tfqa-mc) or accuracy (factor), means over items
    layer_histogram: dict[int, int]  # premature layer -> scored tokens that chose it
    candidates: tuple[int, ...] = ()
    mature: Optional[int] = None
    wall_seconds: float = 0.0  # this run
    scoring_seconds: float = 0.0  # summed over all items, resumed ones included
    resumed: int = 0
    # metric -> its bootstrap interval over the items (stats.Interval.as_dict()); empty with ci=0
    intervals: dict[str, dict] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("records")
        d["layer_histogram"] = {str(k): v for k, v in self.layer_histogram.items()}
        return d


@dataclass(frozen=True)
class Task:
    """One of the DoLa paper's evaluations: how its data loads, how the repo scores an item, and
    what it reports."""

    name: str
    load: Callable[[PathLike], list]
    score_item: Callable[[Model, Any, ScoreOptions], dict]
    relative_top: float  # the repo's lm_score options for this task
    post_softmax: bool
    metric: str  # the per-item metric a progress display shows
    item_metric: Callable[[dict], float]
    summarize: Callable[[list[dict]], dict]
    # metric -> its per-item value (the metric is the mean of it over the items)
    item_values: dict[str, Callable[[dict], float]] = field(default_factory=dict)
    binary: tuple[str, ...] = ()  # the metrics that are right/wrong per item (McNemar compares them)

    def values(self, records: Sequence[dict]) -> dict[str, list[float]]:
        """Each metric's per-item values, in the records' order."""
        return {k: [float(f(r)) for r in records] for k, f in self.item_values.items()}


def mean_of(records: list[dict], value: Callable[[dict], float]) -> float:
    """The mean of ``value`` over ``records`` (NaN for none)."""
    return sum(value(r) for r in records) / len(records) if records else float("nan")


def _tfqa_summary(records: list[dict]) -> dict:
    metrics = {k: mean_of(records, lambda r, k=k: r[k]) for k in ("MC1", "MC2", "MC3")}
    metrics["MC2_nan"] = sum(1 for r in records if r.get("MC2_nan"))
    return metrics


TASKS: dict[str, Task] = {
    TFQA: Task(TFQA, load_truthfulqa, score_truthfulqa, relative_top=0.0, post_softmax=False, metric="MC1",
               item_metric=lambda r: r["MC1"], summarize=_tfqa_summary,
               item_values={k: (lambda r, k=k: r[k]) for k in ("MC1", "MC2", "MC3")}, binary=("MC1",)),
    FACTOR: Task(FACTOR, load_factor, score_factor, relative_top=0.1, post_softmax=True, metric="accuracy",
                 item_metric=lambda r: float(r["correct"]),
                 summarize=lambda records: {"accuracy": mean_of(records, lambda r: float(r["correct"]))},
                 item_values={"accuracy": lambda r: float(r["correct"])}, binary=("accuracy",)),
}


def intervals(task: Union[str, "Task"], records: Sequence[dict], n_resamples: int = stats.N_RESAMPLES,
              seed: int = 0, warn: bool = True) -> dict[str, stats.Interval]:
    """Each of ``task``'s metrics over ``records`` with its percentile-bootstrap interval over the
    items (:func:`dola_cpp.stats.bootstrap_ci` of the per-item values; the same resamples for
    every metric). ``n_resamples=0`` or no records: none. With fewer than ``stats.FEW_ITEMS`` items
    (and ``warn``) one :class:`~dola_cpp.stats.FewItemsWarning` is issued."""
    t = get_task(task)
    if n_resamples <= 0 or not records:
        return {}
    if warn and len(records) < stats.FEW_ITEMS:
        stats.warn_few_items(len(records))
    return {k: stats.bootstrap_ci(v, n_resamples, seed=seed, warn=False) for k, v in t.values(records).items()}


def compare_records(task: Union[str, "Task"], a: Sequence[dict], b: Sequence[dict],
                    n_resamples: int = stats.N_RESAMPLES, seed: int = 0,
                    warn: bool = True) -> tuple[list[int], dict[str, stats.PairedDifference]]:
    """``b - a`` for each of ``task``'s metrics over the items both runs scored (paired by item
    index): the indices, and per metric the difference with its paired bootstrap interval and
    p-value (McNemar's exact test for right/wrong metrics, the paired bootstrap for the others)."""
    t = get_task(task)
    by_index = {r["index"]: r for r in b}
    common = sorted(r["index"] for r in a if r["index"] in by_index)
    if not common:
        raise EvalDataError("the two runs have no item in common")
    if warn and len(common) < stats.FEW_ITEMS:
        stats.warn_few_items(len(common))
    ra = sorted((r for r in a if r["index"] in by_index), key=lambda r: r["index"])
    rb = [by_index[i] for i in common]
    va, vb = t.values(ra), t.values(rb)
    return common, {k: stats.compare(va[k], vb[k], binary=k in t.binary, n_resamples=n_resamples, seed=seed,
                                     warn=False) for k in va}


def read_run(path: PathLike) -> tuple[dict, list[dict]]:
    """A results file's header and its item records (sorted by index; a partial last line is
    ignored). Raises EvalDataError for a file that is not one."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"results file not found: {path}")
    text = path.read_text(encoding="utf-8").splitlines()
    lines = []
    for n, line in enumerate(text, 1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(text):
                    break  # an interrupted write
                raise EvalDataError(f"{path}: line {n} is not JSON") from None
    if not lines or not isinstance(lines[0], dict) or lines[0].get("type") != "header":
        raise EvalDataError(f"{path} is not a dola-cpp results file (no header line)")
    records = sorted((r for r in lines[1:] if r.get("type") == "result"), key=lambda r: r["index"])
    return lines[0], records


def get_task(task: Union[str, Task]) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use {', '.join(map(repr, TASKS))}")
    return TASKS[task]


def layer_histogram(records: list[dict], candidates: Sequence[int]) -> dict[int, int]:
    hist: dict[int, int] = {int(c): 0 for c in candidates}
    for r in records:
        for k, v in r["layers"].items():
            hist[int(k)] = hist.get(int(k), 0) + int(v)
    return hist


def _load_done(path: Path, header: dict) -> Optional[list[dict]]:
    """Records already in ``path`` (after checking they come from the same settings), or None
    when it holds no header yet (a new file); a partial last line from an interrupted write is
    cut off."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1  # complete lines only
    if keep < len(raw):
        with path.open("r+b") as f:
            f.truncate(keep)
    parsed = []
    for n, line in enumerate(raw[:keep].splitlines(), 1):
        if line.strip():
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                raise EvalDataError(f"{path}: line {n} is not JSON; choose another --json path") from None
    if not parsed:
        return None
    if parsed[0].get("type") != "header":
        raise EvalDataError(f"{path} exists and is not a dola-cpp results file; choose another --json path")
    old = {k: v for k, v in parsed[0].items() if k in header}
    if old != header:
        diff = [k for k in header if old.get(k) != header[k]]
        raise EvalDataError(
            f"{path} holds results of a different run ({', '.join(diff)} differ: "
            f"{', '.join(f'{k}={old.get(k)!r}' for k in diff)}); choose another --json path or delete it"
        )
    return [r for r in parsed[1:] if r.get("type") == "result"]


def run_eval(
    task: Union[str, Task],
    model: Model,
    items: Sequence[Union[TruthfulQAItem, FactorItem]],
    *,
    layers: LayerSpec = None,
    premature_norm: bool = False,
    decoder: str = "dola",
    alpha: float = default("alpha"),
    info_layer: Optional[int] = None,
    results_path: Optional[PathLike] = None,
    progress: Optional[Progress] = None,
    header_extra: Optional[dict] = None,
    ci: int = 0,
    seed: int = 0,
) -> EvalSummary:
    """Evaluate ``items`` with the repo's protocol for ``task`` (``"tfqa-mc"`` or ``"factor"``).

    With ``results_path``, each item's record is appended as a JSON line as soon as it is scored
    and items already in the file are skipped (the file's header must match these settings).
    ``decoder="activation"`` scores with Activation Decoding (``alpha``, ``info_layer``) on top of
    the plain or DoLa score, with the task's relative-top and post-softmax settings.
    ``progress(done, total, record)`` is called after every item (and once at the start with
    ``record={}``). ``ci``: bootstrap resamples for the metrics' intervals (0 = none; see
    :func:`intervals`, ``seed`` its seed).
    """
    t = get_task(task)
    config = DecodeConfig().replace(layers=layers, premature_norm=premature_norm, decoder=decoder, alpha=alpha,
                                    info_layer=info_layer)
    plan = model.resolve_layers(layers)
    resolved_info = config.activation.resolve_info_layer(model.n_layers) if config.uses_activation else None
    opts = ScoreOptions(layers=layers, relative_top=t.relative_top, post_softmax=t.post_softmax,
                        premature_norm=premature_norm, decoder=decoder, alpha=float(alpha), info_layer=resolved_info)
    header = {
        "type": "header",
        "task": t.name,
        "model": model.path.name,
        "candidates": list(plan.candidates),
        "mature": plan.mature,
        "premature_norm": bool(premature_norm),
        **({"decoder": config.decoder_name(plan), "alpha": opts.alpha, "info_layer": resolved_info}
           if config.uses_activation else {}),
        "relative_top": opts.relative_top,
        "post_softmax": opts.post_softmax,
        **(header_extra or {}),
    }
    wanted = {item.index for item in items}
    done: list[dict] = []
    out = None
    if results_path is not None:
        path = Path(results_path)
        loaded = _load_done(path, header)
        done = [r for r in loaded or [] if r["index"] in wanted]
        out = path.open("a", encoding="utf-8")
        if loaded is None:
            out.write(json.dumps(header) + "\n")
            out.flush()
    done_ids = {r["index"] for r in done}
    records = list(done)
    todo = [item for item in items if item.index not in done_ids]
    total = len(items)
    t_run = time.perf_counter()
    try:
        if progress:
            progress(len(records), total, {})
        for item in todo:
            t0 = time.perf_counter()
            rec = {"type": "result", **t.score_item(model, item, opts)}
            rec["seconds"] = round(time.perf_counter() - t0, 4)
            records.append(rec)
            if out is not None:
                out.write(json.dumps(rec) + "\n")
                out.flush()
            if progress:
                progress(len(records), total, rec)
    finally:
        if out is not None:
            out.close()
    records.sort(key=lambda r: r["index"])
    return EvalSummary(
        task=t.name,
        n=len(records),
        metrics=t.summarize(records),
        layer_histogram=layer_histogram(records, plan.candidates),
        candidates=tuple(plan.candidates),
        mature=None if plan.is_plain else plan.mature,
        wall_seconds=time.perf_counter() - t_run,
        scoring_seconds=sum(r.get("seconds", 0.0) for r in records),
        resumed=len(done),
        intervals={k: v.as_dict() for k, v in intervals(t, records, ci, seed).items()},
        records=records,
    )

