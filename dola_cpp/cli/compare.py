"""``dola-cpp compare``: the plain, the DoLa and the Activation Decoding answer to one prompt."""

from __future__ import annotations

import shutil
from typing import Annotated

import typer

from .. import GenerationResult
from ._cli_utils import (
    DECODE_OPTIONS, PANEL_OUTPUT, CtxOpt, DecodeOptions, GpuLayersOpt, Layout, MaxTokensOpt, ModelRequiredArg,
    PromptArg, RepackOpt, SystemOpt, Template, TemplateOpt, ThreadsOpt, decode_config, decode_options, examples,
    layer_plan, load_model, note_penalty, prompt_text,
)
from ._render import describe_config, side_by_side, top_layers

COMPARE_EXAMPLES = examples(
    "dola-cpp compare smollm2 'What happens if you crack your knuckles a lot?'",
    "dola-cpp compare model.gguf 'Who invented the telephone?' --layers low -n 64 --layout rows",
    "dola-cpp compare smollm2 'Who wrote Hamlet?' --alpha 1.0 --info-layer 20",
)

# Side by side only when each column gets at least this many characters.
MIN_COLUMN = 48

LayoutOpt = Annotated[Layout, typer.Option("--layout", rich_help_panel=PANEL_OUTPUT, help="columns (side by side), rows (one after the other), "
                                                            "or auto: columns when the terminal is wide enough.")]


@decode_options("compare")
def compare(
    model: ModelRequiredArg,
    prompt: PromptArg,
    decode: DecodeOptions = DECODE_OPTIONS,  # the table's options for compare (dola_cpp.settings)
    max_tokens: MaxTokensOpt = 128,
    system: SystemOpt = None,
    template: TemplateOpt = Template.auto,
    layout: LayoutOpt = Layout.auto,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    repack: RepackOpt = True,
) -> None:
    """Compare the plain, DoLa and Activation Decoding answers.

    Answers PROMPT with plain greedy decoding, with DoLa and with Activation Decoding, and shows
    the answers side by side (or one after the other).

    The Activation Decoding answer runs without DoLa's contrast (the reference's `activation`;
    `dola-cpp generate --decoder activation --layers high` gives `activation_dola`), with
    --alpha, --info-layer and --premature-norm/--raw. With --layers none there is no DoLa answer.
    --repetition-penalty applies to every answer; without it, plain decoding uses 1.0 and the
    others 1.2 (the library defaults), as the headings say.
    """
    layers, repetition_penalty, premature_norm = decode["layers"], decode["repetition_penalty"], decode["premature_norm"]
    m = load_model(model, ctx, threads, gpu_layers, repack)
    plan = layer_plan(m, layers)
    plain_plan = m.resolve_layers(None)
    plain_config = decode_config(m, repetition_penalty=repetition_penalty)
    runs = [(plain_config, plain_plan)]
    if not plan.is_plain:
        runs.append((plain_config.replace(layers=layers, premature_norm=premature_norm), plan))
        note_penalty(runs[-1][0], plan)
    act_config = decode_config(m, repetition_penalty=repetition_penalty, premature_norm=premature_norm,
                               decoder="activation", alpha=decode["alpha"], info_layer=decode["info_layer"])
    runs.append((act_config, plain_plan))
    text, _ = prompt_text(m, prompt, template, system)
    panes = []
    for config, p in runs:
        result = m.generate(text, max_tokens, config=config)
        title = f"{describe_config(config, p, m.n_layers)} (repetition penalty {config.penalty(p)}) · {_speed(result)}"
        if not p.is_plain:
            title += f" · chosen: {top_layers(result.layer_histogram())}"
        panes.append((title, result.text.strip()))
    width = shutil.get_terminal_size().columns
    if layout is Layout.columns or (layout is Layout.auto and width >= len(panes) * (MIN_COLUMN + 3)):
        typer.echo(side_by_side(*panes, width=max(width, len(panes) * 23)))
    else:
        typer.echo("\n\n".join(f"── {title}\n{body}" for title, body in panes))


def _speed(result: GenerationResult) -> str:
    return f"{len(result.tokens)} tokens, {result.tokens_per_second:.0f} tok/s"
