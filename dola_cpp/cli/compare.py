"""``dola-cpp compare``: the plain and the DoLa answer to one prompt."""

from __future__ import annotations

import dataclasses
import shutil
from typing import Annotated

import typer

from .. import GenerationResult
from ._cli_utils import (
    CLIError, CtxOpt, DecodeSettings, GpuLayersOpt, RepackOpt, LayersOpt, Layout, MaxTokensOpt, ModelRequiredArg, PromptArg,
    PrematureNormOpt, RepetitionPenaltyOpt, SystemOpt, Template, TemplateOpt, ThreadsOpt, examples, layer_plan, load_model,
    penalty_note, prompt_text, quiet_penalty_warning,
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
    note = penalty_note(plan, repetition_penalty)
    if note:
        typer.echo(note, err=True)
    text, _ = prompt_text(m, prompt, template, system)
    plain_settings = DecodeSettings(layers="none", repetition_penalty=repetition_penalty, max_tokens=max_tokens)
    dola_settings = dataclasses.replace(plain_settings, layers=layers, premature_norm=premature_norm)
    plain = m.generate(text, **plain_settings.kwargs())
    with quiet_penalty_warning():
        dola = m.generate(text, **dola_settings.kwargs())
    plain_plan = m.resolve_layers("none")
    panes = [
        (f"plain (repetition penalty {plain_settings.effective_penalty(plain_plan)}) · {_speed(plain)}",
         plain.text.strip()),
        (f"{describe_plan(plan, m.n_layers, premature_norm)} (repetition penalty {dola_settings.effective_penalty(plan)})"
         f" · {_speed(dola)} · chosen: {top_layers(dola.layer_histogram())}", dola.text.strip()),
    ]
    width = shutil.get_terminal_size().columns
    if layout is Layout.columns or (layout is Layout.auto and width >= 2 * MIN_COLUMN + 3):
        typer.echo(side_by_side(panes[0], panes[1], max(width, 2 * 20 + 3)))
    else:
        typer.echo(f"── {panes[0][0]}\n{panes[0][1]}\n\n── {panes[1][0]}\n{panes[1][1]}")


def _speed(result: GenerationResult) -> str:
    return f"{len(result.tokens)} tokens, {result.tokens_per_second:.0f} tok/s"
