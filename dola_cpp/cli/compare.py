"""``dola-cpp compare``: the plain and the DoLa answer to one prompt."""

from __future__ import annotations

import shutil
from typing import Annotated

import typer

from .. import DecodeConfig, GenerationResult
from ._cli_utils import (
    CLIError, CtxOpt, GpuLayersOpt, LayersOpt, Layout, MaxTokensOpt, ModelRequiredArg, PrematureNormOpt, PromptArg,
    RepackOpt, RepetitionPenaltyOpt, SystemOpt, Template, TemplateOpt, ThreadsOpt, examples, layer_plan, load_model,
    note_penalty, prompt_text,
)
from ._render import describe_plan, side_by_side, top_layers

COMPARE_EXAMPLES = examples(
    "dola-cpp compare smollm2 'What happens if you crack your knuckles a lot?'",
    "dola-cpp compare model.gguf 'Who invented the telephone?' --layers low -n 64 --layout rows",
)

# Side by side only when each column gets at least this many characters.
MIN_COLUMN = 48

LayoutOpt = Annotated[Layout, typer.Option("--layout", help="columns (side by side), rows (one after the other), "
                                                            "or auto: columns when the terminal is wide enough.")]


def compare(
    model: ModelRequiredArg,
    prompt: PromptArg,
    layers: LayersOpt = "high",
    repetition_penalty: RepetitionPenaltyOpt = None,
    premature_norm: PrematureNormOpt = True,
    max_tokens: MaxTokensOpt = 128,
    system: SystemOpt = None,
    template: TemplateOpt = Template.auto,
    layout: LayoutOpt = Layout.auto,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    repack: RepackOpt = True,
) -> None:
    """Answer PROMPT with plain greedy decoding and with DoLa, and show both.

    --repetition-penalty applies to both answers; without it, plain decoding uses 1.0 and DoLa
    1.2 (the library defaults), as the headings say.
    """
    m = load_model(model, ctx, threads, gpu_layers, repack)
    plan = layer_plan(m, layers)
    if plan.is_plain:
        raise CLIError(f"--layers {layers} means plain decoding: nothing to compare; use high, low or a layer list")
    plain_config = DecodeConfig(repetition_penalty=repetition_penalty)
    dola_config = plain_config.replace(layers=layers, premature_norm=premature_norm)
    note_penalty(dola_config, plan)
    text, _ = prompt_text(m, prompt, template, system)
    plain = m.generate(text, max_tokens, config=plain_config)
    dola = m.generate(text, max_tokens, config=dola_config)
    panes = [
        (f"plain (repetition penalty {plain_config.penalty(m.resolve_layers(None))}) · {_speed(plain)}",
         plain.text.strip()),
        (f"{describe_plan(plan, m.n_layers, premature_norm)} (repetition penalty {dola_config.penalty(plan)})"
         f" · {_speed(dola)} · chosen: {top_layers(dola.layer_histogram())}", dola.text.strip()),
    ]
    width = shutil.get_terminal_size().columns
    if layout is Layout.columns or (layout is Layout.auto and width >= 2 * MIN_COLUMN + 3):
        typer.echo(side_by_side(panes[0], panes[1], max(width, 2 * 20 + 3)))
    else:
        typer.echo(f"── {panes[0][0]}\n{panes[0][1]}\n\n── {panes[1][0]}\n{panes[1][1]}")


def _speed(result: GenerationResult) -> str:
    return f"{len(result.tokens)} tokens, {result.tokens_per_second:.0f} tok/s"
