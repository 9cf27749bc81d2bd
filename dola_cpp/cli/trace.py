"""``dola-cpp trace``: the DoLa paper's figure 2 for one generation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import trace as tr
from ._cli_utils import (
    DECODE_OPTIONS, PANEL_OUTPUT, CLIError, CtxOpt, DecodeOptions, GpuLayersOpt, MaxTokensOpt, ModelRequiredArg,
    PromptArg, RepackOpt, SystemOpt, Template, TemplateOpt, ThreadsOpt, decode_config, decode_options, examples,
    layer_plan, load_model, prompt_text,
)
from ._render import describe_config

TRACE_EXAMPLES = examples(
    "dola-cpp trace smollm2 'What is the capital of France?' --out trace.png",
    "dola-cpp trace smollm2 'Who wrote Hamlet?' --layers 0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30 --out t.html",
)


@decode_options("trace")
def trace(
    model: ModelRequiredArg,
    prompt: PromptArg,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
                                      help="The picture: .png, .svg, .pdf (matplotlib) or .html.")]
    = Path("trace.png"),
    decode: DecodeOptions = DECODE_OPTIONS,  # the table's options for trace (dola_cpp.settings)
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 64,
    template: TemplateOpt = Template.auto,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    repack: RepackOpt = True,
) -> None:
    """Draw how DoLa's layers compare, token by token, for one answer.

    Generates an answer to PROMPT with dynamic DoLa (greedy) and draws, per generated token, the JSD
    between the mature layer and every candidate layer, the chosen premature layer and the token's risk."""
    if out.suffix.lower() not in (*tr.IMAGE_SUFFIXES, ".html"):
        raise typer.BadParameter(f"write .png, .svg, .pdf or .html, not {out.name!r}", param_hint="--out")
    layers = decode["layers"]
    m = load_model(model, ctx, threads, gpu_layers, repack)
    plan = layer_plan(m, layers)
    if len(plan.candidates) < 2:
        raise CLIError(f"--layers {layers}: a trace needs two or more candidate layers (dynamic DoLa)")
    config = decode_config(m, **decode)
    text, _ = prompt_text(m, prompt, template, system)
    result = m.generate(text, max_tokens, config=config)
    pieces = [m.detokenize([t]) for t in result.tokens]
    title = (f"{m.path.name} · {describe_config(config, plan, m.n_layers)} · {prompt[:60]!r} · "
             f"{len(result.tokens)} tokens, risk {result.risk if result.risk is not None else float('nan'):.2f}")
    try:
        tr.write(out, result, pieces, title)
    except (ValueError, ModuleNotFoundError) as e:
        raise CLIError(str(e)) from None
    typer.echo(f"{out} ({len(result.tokens)} tokens x {len(plan.candidates)} layers): {result.text.strip()[:200]}")
