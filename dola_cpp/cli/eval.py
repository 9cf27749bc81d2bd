"""``dola-cpp eval``: the DoLa paper's multiple-choice evaluations (TruthfulQA MC, FACTOR)."""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import evaldata
from .. import evaluate as ev
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
         threads, kv_type, subset: Optional[FactorSubset] = None) -> None:
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
            )
        except ev.EvalDataError as e:
            raise CLIError(f"--json: {e}") from None
        wall = time.perf_counter() - t0

    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("items", str(summary.n) + (f" ({summary.resumed} resumed)" if summary.resumed else ""))
    for k, v in summary.metrics.items():
        if k == "MC2_nan":
            if v:
                table.add_row("MC2 overflow → 0", str(v))
        else:
            table.add_row(k, f"{v:.4f}")
    table.add_row("wall time", f"{wall:.1f} s")
    if summary.resumed:
        table.add_row("scoring time (all items)", f"{summary.scoring_seconds:.1f} s")
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
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    kv_type: KVTypeOpt = KVType.f32,
) -> None:
    """Score TruthfulQA MC1, MC2 and MC3 as the DoLa repository does.

    The DoLa repository's tfqa_mc_eval.py: a 6-shot prompt, relative_top=0."""
    _run(ev.TASKS[ev.TFQA], model, data, _layer_spec(early_exit_layers, decode["layers"]), decode, limit, json_out,
         ctx, threads, kv_type)


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
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    kv_type: KVTypeOpt = KVType.f32,
) -> None:
    """Score FACTOR accuracy as the DoLa repository does.

    The DoLa repository's factor_eval.py: relative_top=0.1, post-softmax."""
    _run(ev.TASKS[ev.FACTOR], model, data, _layer_spec(early_exit_layers, decode["layers"]), decode, limit, json_out,
         ctx, threads, kv_type, subset)


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
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    kv_type: KVTypeOpt = KVType.f32,
) -> None:
    """Plot TruthfulQA accuracy against coverage for each risk signal.

    Selective QA: ranks the questions by each risk signal and plots MC1 accuracy against coverage,
    in plain and DoLa modes."""
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
        results.append(sel.curves(summary.records, m.n_vocab, label if plan.candidates else "plain"))
    json_path, png_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".png")
    sel.write_json(json_path, m.path.name, results)
    table = Table(title=f"area under accuracy-coverage (MC1), {m.path.name}")
    table.add_column("signal")
    for r in results:
        table.add_column(r.mode, justify="right")
    names = list(dict.fromkeys(s for r in results for s in r.aucs))
    for s in names:
        table.add_row(s, *(f"{r.aucs[s]:.3f}" if s in r.aucs else "—" for r in results))
    console.print(table)
    try:
        sel.plot(png_path, m.path.name, results)
        console.print(f"plot: {png_path}")
    except ModuleNotFoundError as e:
        console.print(f"[yellow]no plot: {e}[/]")
    console.print(f"curves: {json_path}")
