"""``dola-cpp eval``: the DoLa paper's multiple-choice evaluations (TruthfulQA MC, FACTOR)."""

from __future__ import annotations

import json
import sys
import time
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import evaldata
from .. import evaluate as ev
from .. import stats
from ._cli_utils import (
    DECODE_OPTIONS, PANEL_DECODING, PANEL_ENGINE, PANEL_OUTPUT, CLIError, CtxOpt, DecodeOptions, DolaCommand,
    ModelRequiredArg, ThreadsOpt, decode_config, decode_options, layer_plan, load_model,
)
from ._render import describe_config

app = typer.Typer(
    help="Reproduce the DoLa paper's multiple-choice evaluations.\n\nTruthfulQA MC and FACTOR, with the DoLa "
         "repository's protocol, and selective question answering by risk.",
    no_args_is_help=True,
)

DataOpt = Annotated[Optional[Path], typer.Option(
    "--data", metavar="CSV", show_default=False,
    help="The dataset CSV. Without it the published file is downloaded once into the cache, with its licence.")]


class FactorSubset(str, Enum):
    news = "news"
    expert = "expert"
    wiki = "wiki"


SubsetOpt = Annotated[Optional[FactorSubset], typer.Option(
    "--subset", show_default=False, help="Which published FACTOR file to download when --data is not given "
                                         "[default: news].")]
EarlyExitOpt = Annotated[
    Optional[str],
    typer.Option(
        "--early-exit-layers", metavar="LAYERS", rich_help_panel=PANEL_DECODING,
        help="The DoLa repo's layer string: one value (-1) = plain, two = static 'premature,mature', "
        "more = dynamic with the last as mature.",
    ),
]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", metavar="N", min=1, show_default=False,
                                                 help="Evaluate only the first N items (default: all).")]
JsonOpt = Annotated[
    Optional[Path], typer.Option("--json", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
                                 help="Append per-item results as JSON lines here; a rerun resumes.")
]


CIOpt = Annotated[int, typer.Option(
    "--ci", metavar="N", min=0, rich_help_panel=PANEL_OUTPUT,
    help="Bootstrap resamples over the items for each metric's 95% interval (seeded; 0 = no intervals).")]


@contextmanager
def few_items_note():
    """Run a block that computes intervals; stats.FewItemsWarning becomes one 'warning:' line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", stats.FewItemsWarning)
        yield
    shown = set()
    for w in caught:
        if issubclass(w.category, stats.FewItemsWarning):
            if str(w.message) not in shown:
                shown.add(str(w.message))
                typer.echo(f"warning: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def p_text(p: float, n_resamples: int) -> str:
    """A p-value; a bootstrap's 0 is below one resample's share."""
    return f"< {1 / max(n_resamples, 1):.0e}" if p == 0 else f"{p:.3g}"


def interval_text(iv: Optional[dict]) -> str:
    return f"[{iv['low']:.4f}, {iv['high']:.4f}]" if iv else ""


class KVType(str, Enum):
    f32 = "f32"
    f16 = "f16"


KVTypeOpt = Annotated[
    KVType,
    typer.Option(
        "--kv-type", rich_help_panel=PANEL_ENGINE,
        help="KV cache type. f32 (default) makes a score independent of whether the prompt's cache was "
        "reused; with f16, llama.cpp's attention kernels differ between a long and a short batch.",
    ),
]


def _layer_spec(early_exit_layers: Optional[str], layers: Optional[str]):
    if early_exit_layers is not None and layers is not None:
        raise typer.BadParameter("give either --early-exit-layers or --layers, not both", param_hint="--layers")
    if early_exit_layers is not None:
        try:
            return ev.early_exit_layers(early_exit_layers)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--early-exit-layers") from None
    return layers


def _items(task: str, load, data: Optional[Path], limit: Optional[int],
           subset: Optional[FactorSubset] = None) -> tuple[Path, list]:
    """The data file and its first ``limit`` items, or a one-line error about the file. Without
    ``data`` the task's published file comes from the cache, downloaded on first use."""
    if data is not None and subset is not None:
        raise CLIError("give either --data or --subset, not both")
    if data is None:
        name = "truthfulqa" if task == ev.TFQA else f"factor-{(subset or FactorSubset.news).value}"
        try:
            data = evaldata.fetch(name, progress=lambda msg: print(msg, file=sys.stderr))
        except evaldata.DataUnavailable as e:
            raise CLIError(str(e)) from None
    try:
        items = load(data)
    except ev.EvalDataError as e:
        raise CLIError(f"--data: {e}") from None
    return data, (items[:limit] if limit else items)


def _run(task: ev.Task, model_ref: str, data: Optional[Path], spec, decode: DecodeOptions, limit, json_out, ctx,
         threads, kv_type, subset: Optional[FactorSubset] = None, ci: int = stats.N_RESAMPLES) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    console = Console()
    data, items = _items(task.name, task.load, data, limit, subset)
    model = load_model(model_ref, ctx, threads, kv_type=kv_type.value)
    plan = layer_plan(model, spec) if spec is not None else model.resolve_layers(None)
    config = decode_config(model, **{**decode, "layers": spec})
    console.print(f"[bold]{task.name}[/] {model.path.name}: {len(items)} items, "
                  f"{describe_config(config, plan, model.n_layers)}", highlight=False, soft_wrap=True)

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    counts = {"n": 0, "sum": 0.0}

    with Progress(*columns, console=console, transient=False) as bar:
        bar_id = bar.add_task(task.name, total=len(items), status="")

        def progress(done: int, total: int, rec: dict) -> None:
            if rec:
                counts["n"] += 1
                counts["sum"] += task.item_metric(rec)
            status = f"{task.metric} {counts['sum'] / counts['n']:.3f}" if counts["n"] else ""
            bar.update(bar_id, completed=done, status=status)

        t0 = time.perf_counter()
        with few_items_note():
            try:
                summary = ev.run_eval(
                    task,
                    model,
                    items,
                    layers=spec,
                    premature_norm=decode["premature_norm"],
                    decoder=config.decoder,
                    alpha=decode["alpha"],
                    info_layer=decode["info_layer"],
                    results_path=json_out,
                    progress=progress,
                    header_extra={"data": data.name, "kv_type": kv_type.value},
                    ci=ci,
                )
            except ev.EvalDataError as e:
                raise CLIError(f"--json: {e}") from None
        wall = time.perf_counter() - t0

    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    if ci:
        table.add_column("95% interval", justify="right")
    pad = [""] if ci else []
    table.add_row("items", str(summary.n) + (f" ({summary.resumed} resumed)" if summary.resumed else ""), *pad)
    for k, v in summary.metrics.items():
        if k == "MC2_nan":
            if v:
                table.add_row("MC2 overflow → 0", str(v), *pad)
        else:
            table.add_row(k, f"{v:.4f}", *([interval_text(summary.intervals.get(k))] if ci else []))
    table.add_row("wall time", f"{wall:.1f} s", *pad)
    if summary.resumed:
        table.add_row("scoring time (all items)", f"{summary.scoring_seconds:.1f} s", *pad)
    console.print(table)
    if summary.layer_histogram:
        total = sum(summary.layer_histogram.values()) or 1
        hist = Table(caption="premature layer usage, per scored token")
        hist.add_column("layer", justify="right")
        hist.add_column("tokens", justify="right")
        hist.add_column("%", justify="right")
        for layer, count in sorted(summary.layer_histogram.items()):
            hist.add_row(str(layer), str(count), f"{100 * count / total:.1f}")
        console.print(hist)
    if json_out is not None:
        console.print(f"results: {json_out}")
        console.print(
            "summary: " + json.dumps({**summary.as_dict(), "wall_seconds": round(wall, 2)}), soft_wrap=True, markup=False
        )


@app.command("tfqa-mc", cls=DolaCommand)
@decode_options("eval tfqa-mc")
def tfqa_mc(
    model: ModelRequiredArg,
    data: DataOpt = None,
    early_exit_layers: EarlyExitOpt = None,
    decode: DecodeOptions = DECODE_OPTIONS,  # the table's options for eval tfqa-mc (dola_cpp.settings)
    limit: LimitOpt = None,
    json_out: JsonOpt = None,
    ci: CIOpt = stats.N_RESAMPLES,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    kv_type: KVTypeOpt = KVType.f32,
) -> None:
    """Score TruthfulQA MC1, MC2 and MC3 as the DoLa repository does.

    The DoLa repository's tfqa_mc_eval.py: a 6-shot prompt, relative_top=0. Each metric comes with
    its 95% bootstrap interval over the questions."""
    _run(ev.TASKS[ev.TFQA], model, data, _layer_spec(early_exit_layers, decode["layers"]), decode, limit, json_out,
         ctx, threads, kv_type, ci=ci)


@app.command("factor", cls=DolaCommand)
@decode_options("eval factor")
def factor(
    model: ModelRequiredArg,
    data: DataOpt = None,
    subset: SubsetOpt = None,
    early_exit_layers: EarlyExitOpt = None,
    decode: DecodeOptions = DECODE_OPTIONS,  # the table's options for eval factor (dola_cpp.settings)
    limit: LimitOpt = None,
    json_out: JsonOpt = None,
    ci: CIOpt = stats.N_RESAMPLES,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    kv_type: KVTypeOpt = KVType.f32,
) -> None:
    """Score FACTOR accuracy as the DoLa repository does.

    The DoLa repository's factor_eval.py: relative_top=0.1, post-softmax. The accuracy comes with
    its 95% bootstrap interval over the examples."""
    _run(ev.TASKS[ev.FACTOR], model, data, _layer_spec(early_exit_layers, decode["layers"]), decode, limit, json_out,
         ctx, threads, kv_type, subset, ci=ci)


@app.command("selective", cls=DolaCommand)
@decode_options("eval selective")
def selective(
    model: ModelRequiredArg,
    data: DataOpt = None,
    decode: DecodeOptions = DECODE_OPTIONS,  # the table's options for eval selective (dola_cpp.settings)
    limit: LimitOpt = None,
    out: Annotated[Path, typer.Option("--out", metavar="OUT", rich_help_panel=PANEL_OUTPUT, help="Writes OUT.json (curves and areas), OUT.png (the plot) and "
                                                    "OUT.plain.jsonl / OUT.dola.jsonl (per question; a rerun "
                                                    "resumes).")] = Path("selective"),
    ci: CIOpt = stats.N_RESAMPLES,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    kv_type: KVTypeOpt = KVType.f32,
) -> None:
    """Plot TruthfulQA accuracy against coverage for each risk signal.

    Selective QA: ranks the questions by each risk signal and plots MC1 accuracy against coverage,
    in plain and DoLa modes, with 95% bootstrap bands over the questions (--ci)."""
    from rich.console import Console
    from rich.table import Table

    from .. import selective as sel

    layers, premature_norm = decode["layers"], decode["premature_norm"]
    console = Console()
    if layers.strip().lower() == "none":
        raise typer.BadParameter("the DoLa mode needs layers ('high', 'low' or a layer string)", param_hint="--layers")
    data, items = _items(ev.TFQA, ev.load_truthfulqa, data, limit)
    m = load_model(model, ctx, threads, kv_type=kv_type.value)
    dola_plan = layer_plan(m, layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for name, spec in (("plain", None), ("dola", layers)):
        plan = dola_plan if spec else m.resolve_layers(None)
        label = "plain" if spec is None else f"DoLa {layers}" + (" (premature norm)" if premature_norm else "")
        console.print(f"[bold]selective[/] {m.path.name}: {len(items)} questions, {label}", highlight=False)
        try:
            summary = ev.run_eval(
                sel.TASK, m, items, layers=spec, premature_norm=premature_norm and spec is not None,
                results_path=out.with_name(f"{out.name}.{name}.jsonl"),
                header_extra={"data": data.name, "kv_type": kv_type.value, "n_vocab": m.n_vocab},
            )
        except ev.EvalDataError as e:
            raise CLIError(f"--out: {e}") from None
        results.append(sel.curves(summary.records, m.n_vocab, label if plan.candidates else "plain",
                                  n_resamples=ci))
    if ci and len(items) < stats.FEW_ITEMS:
        typer.echo(f"warning: {stats.few_items_message(len(items))}", err=True)
    json_path, png_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".png")
    sel.write_json(json_path, m.path.name, results)
    table = Table(title=f"area under accuracy-coverage (MC1), {m.path.name}")
    table.add_column("signal")
    for r in results:
        table.add_column(r.mode, justify="right")
    names = list(dict.fromkeys(s for r in results for s in r.aucs))

    def cell(r, s: str) -> str:
        if s not in r.aucs:
            return "—"
        iv = r.auc_intervals.get(s)
        return f"{r.aucs[s]:.3f}" + (f" [{iv.low:.3f}, {iv.high:.3f}]" if iv else "")

    for s in names:
        table.add_row(s, *(cell(r, s) for r in results))
    console.print(table)
    try:
        sel.plot(png_path, m.path.name, results)
        console.print(f"plot: {png_path}")
    except ModuleNotFoundError as e:
        console.print(f"[yellow]no plot: {e}[/]")
    console.print(f"curves: {json_path}")


# ---------------------------------------------------------------------------- compare


@app.command("compare", cls=DolaCommand)
def compare(
    run_a: Annotated[Path, typer.Argument(metavar="RUN_A", help="A results file (--json of tfqa-mc or factor): the "
                                                             "baseline.", show_default=False)],
    run_b: Annotated[Path, typer.Argument(metavar="RUN_B", help="Another run of the same task on the same items.",
                                          show_default=False)],
    ci: CIOpt = stats.N_RESAMPLES,
    as_json: Annotated[bool, typer.Option("--json", rich_help_panel=PANEL_OUTPUT,
                                          help="Print JSON instead of the table.")] = False,
) -> None:
    """Compare two runs of the same items, with paired tests.

    Items are paired by their index; only the items both runs scored count. Accuracies (MC1,
    FACTOR) get McNemar's exact test, MC2 and MC3 the paired bootstrap; the interval is the paired
    bootstrap's (--ci resamples, seeded)."""
    runs = []
    for path in (run_a, run_b):
        try:
            runs.append(ev.read_run(path))
        except ev.EvalDataError as e:
            raise CLIError(str(e)) from None
    (ha, ra), (hb, rb) = runs
    if ha.get("task") != hb.get("task"):
        raise CLIError(f"the runs are of different tasks ({ha.get('task')} and {hb.get('task')})")
    if ha.get("data") != hb.get("data"):
        raise CLIError(f"the runs are of different data files ({ha.get('data')} and {hb.get('data')})")
    try:
        task = _task_of(ha.get("task"))
    except ValueError as e:
        raise CLIError(str(e)) from None
    with few_items_note():
        try:
            common, diffs = ev.compare_records(task, ra, rb, max(ci, 1))
        except ev.EvalDataError as e:
            raise CLIError(str(e)) from None
    pa = [r for r in ra if r["index"] in set(common)]
    pb = [r for r in rb if r["index"] in set(common)]
    ma, mb = task.summarize(pa), task.summarize(pb)
    ia, ib = ev.intervals(task, pa, ci, warn=False), ev.intervals(task, pb, ci, warn=False)
    if as_json:
        typer.echo(json.dumps({
            "task": task.name, "a": str(run_a), "b": str(run_b), "n": len(common),
            "only_a": len(ra) - len(common), "only_b": len(rb) - len(common),
            "metrics": {k: {"a": ma[k], "b": mb[k], "a_interval": ia[k].as_dict() if k in ia else None,
                            "b_interval": ib[k].as_dict() if k in ib else None,
                            "difference": d.as_dict()} for k, d in diffs.items()},
        }, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    def run_name(path: Path, header: dict) -> str:
        cands = header.get("candidates") or []
        layers = "plain" if not cands else f"{cands} vs {header.get('mature')}"
        return f"{path.name} ({layers})"

    console = Console()
    console.print(f"[bold]{task.name}[/]: A = {run_name(run_a, ha)}, B = {run_name(run_b, hb)}; "
                  f"{len(common)} items in both", highlight=False, soft_wrap=True)
    extra = [f"{n} only in {w}" for n, w in ((len(ra) - len(common), "A"), (len(rb) - len(common), "B")) if n]
    if extra:
        console.print("(not compared: " + ", ".join(extra) + ")", highlight=False)
    table = Table()
    for col in ("metric", "A", "B", "B − A", "95% interval", "p", "test"):
        table.add_column(col, justify="left" if col in ("metric", "test") else "right")
    for k, d in diffs.items():
        table.add_row(k, f"{ma[k]:.4f}", f"{mb[k]:.4f}", f"{d.diff.value:+.4f}",
                      f"[{d.diff.low:+.4f}, {d.diff.high:+.4f}]" if ci else "", p_text(d.p_value, ci), d.test)
    console.print(table)


def _task_of(name: Optional[str]) -> ev.Task:
    if name == "selective":
        from .. import selective as sel

        return sel.TASK
    return ev.get_task(name or "")


# ---------------------------------------------------------------------------- sweep


class SweepTask(str, Enum):
    tfqa_mc = "tfqa-mc"
    factor = "factor"


@app.command("sweep", cls=DolaCommand)
def sweep(
    model: ModelRequiredArg,
    task: Annotated[SweepTask, typer.Option("--task", help="The evaluation to choose layers on.")] = SweepTask.tfqa_mc,
    data: DataOpt = None,
    subset: SubsetOpt = None,
    limit: LimitOpt = None,
    split: Annotated[float, typer.Option(
        "--split", metavar="F", help="The share of the items that validates (chooses the layers); the rest "
        "tests the choice. The items are ordered by a permutation seeded with --split-seed; the first "
        "round(F x n) validate.")] = 0.5,
    split_seed: Annotated[int, typer.Option("--split-seed", help="The split's (and the bootstrap's) seed.")] = 0,
    buckets: Annotated[Optional[str], typer.Option(
        "--buckets", metavar="RANGES", show_default=False,
        help="The buckets of candidate layers, inclusive ranges such as 0-7,8-15 (each contributes its even "
        "layers) [default: ranges of about N/4 layers, as the DoLa paper's].")] = None,
    metric: Annotated[Optional[str], typer.Option(
        "--metric", show_default=False, help="The metric that chooses [default: MC1 for tfqa-mc, accuracy "
        "for factor].")] = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", rich_help_panel=PANEL_OUTPUT,
                                      help="Per-setting run files (a rerun resumes), sweep.json and "
                                           "sweep.png go here.")] = Path("sweep"),
    ci: CIOpt = stats.N_RESAMPLES,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    kv_type: KVTypeOpt = KVType.f32,
) -> None:
    """Choose DoLa's layers, then test the choice against plain.

    Scores plain decoding, --layers low and high, and the paper's buckets of candidate layers on
    the validation split; the best on --metric and plain are then scored on the test split, and
    the difference gets its paired interval and test. Prints the --layers value to use."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from .. import sweep as sw

    t = ev.TASKS[task.value]
    try:
        metric = sw.check_metric(t, metric)
    except sw.SweepError as e:
        raise CLIError(str(e)) from None
    if task is SweepTask.tfqa_mc and subset is not None:
        raise CLIError("--subset is FACTOR's; TruthfulQA has one file")
    data, items = _items(t.name, t.load, data, limit, subset)
    try:
        sw.split_items(items, split, split_seed)
    except sw.SweepError as e:
        raise CLIError(str(e)) from None
    m = load_model(model, ctx, threads, kv_type=kv_type.value)
    try:
        chosen_buckets = sw.parse_buckets(buckets, m.n_layers) if buckets is not None else None
    except sw.SweepError as e:
        raise CLIError(str(e)) from None
    console = Console()
    n_val = int(round(split * len(items)))
    console.print(f"[bold]sweep[/] {m.path.name}: {t.name}, {len(items)} items ({n_val} validate, "
                  f"{len(items) - n_val} test), choosing on {metric}", highlight=False, soft_wrap=True)
    if ci and min(n_val, len(items) - n_val) < stats.FEW_ITEMS:
        typer.echo(f"warning: {stats.few_items_message(min(n_val, len(items) - n_val))}", err=True)
    sha = sw.model_sha256(m.path)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        bar_id = bar.add_task("sweep", total=0)

        def progress(event: str, setting: str, count: int) -> None:
            if event == "plan":
                bar.update(bar_id, total=(bar.tasks[0].total or 0) + count)
            elif event == "start":
                bar.update(bar_id, description=setting)
            else:
                bar.advance(bar_id, count)

        try:
            result = sw.run_sweep(t, m, items, out, fraction=split, seed=split_seed, buckets=chosen_buckets, metric=metric,
                                  n_resamples=ci, header_extra={"data": data.name, "kv_type": kv_type.value},
                                  progress=progress, model_sha256=sha)
        except ev.EvalDataError as e:
            raise CLIError(f"--out: {e}") from None
    table = Table(title=f"{t.name} sweep, {m.path.name}: {metric} (95% interval)")
    for col in ("setting", "candidates", "validation", "test", "scored now"):
        table.add_column(col, justify="left" if col in ("setting", "candidates") else "right")

    def cell(summary: Optional[dict]) -> str:
        if not summary:
            return ""
        v, iv = summary["metrics"][metric], summary["intervals"].get(metric)
        return f"{v:.3f}" + (f" [{iv['low']:.3f}, {iv['high']:.3f}]" if iv else "")

    for row in result["settings"]:
        scored = row["validation"]["scored"] + (row["test"]["scored"] if row["test"] else 0)
        name = row["name"] + (" *" if row["name"] == result["chosen"] else "")
        cands = "—" if not row["candidates"] else f"{row['candidates']} vs {row['mature']}"
        table.add_row(name, cands, cell(row["validation"]), cell(row["test"]), str(scored))
    console.print(table)
    png = out / sw.SWEEP_PNG
    try:
        sw.plot(png, result)
        console.print(f"plot: {png}")
    except ModuleNotFoundError as e:
        console.print(f"[yellow]no plot: {e}[/]")
    console.print(f"results: {out / sw.SWEEP_JSON}")
    cached = sw.cache_result(result)
    if cached is not None:
        console.print(f"kept for `dola-cpp info`: {cached}", highlight=False)
    console.print(sw.verdict(result), highlight=False, soft_wrap=True)
