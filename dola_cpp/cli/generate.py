"""``dola-cpp generate``: one completion."""

from __future__ import annotations

import json
from typing import Annotated, List, Optional

import typer

from .. import DecodeConfig, GenerationResult, LayerPlan, Model
from ..results import finite
from ._cli_utils import (
    DECODE_OPTIONS, PANEL_STOPPING, AbstainOpt, CtxOpt, DecodeOptions, GpuLayersOpt, GrammarFileOpt, JsonOpt,
    JsonSchemaFileOpt, MaxTokensOpt, ModelRequiredArg, PromptArg, RepackOpt, RpcOpt, StopLoopsOpt, SystemOpt,
    Template, TemplateOpt, ThreadsOpt, constraint_grammar, decode_config, decode_options, examples, layer_plan,
    load_model, note_penalty, prompt_text,
)

GENERATE_EXAMPLES = examples(
    "dola-cpp generate smollm2 'The capital of France is' --template none -n 16",
    "dola-cpp generate model.gguf 'Who wrote Hamlet?' --layers low",
    "dola-cpp generate smollm2 'Who wrote Hamlet?' --decoder activation --layers none",
    "dola-cpp generate smollm2 'Name three planets.' --json | jq '.steps[].premature_layer'",
    "dola-cpp generate smollm2 'Describe a cat as JSON.' --json-schema cat.schema.json",
)

StopOpt = Annotated[Optional[List[str]], typer.Option("--stop", metavar="TEXT", show_default=False,
                                                      rich_help_panel=PANEL_STOPPING,
                                                      help="Stop at this text (repeatable).")]


@decode_options("generate")
def generate(
    model: ModelRequiredArg,
    prompt: PromptArg,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 256,
    decode: DecodeOptions = DECODE_OPTIONS,  # the table's options for generate (dola_cpp.settings)
    abstain: AbstainOpt = None,
    stop: StopOpt = None,
    stop_loops: StopLoopsOpt = False,
    template: TemplateOpt = Template.auto,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    repack: RepackOpt = True,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
    grammar_file: GrammarFileOpt = None,
    json_schema_file: JsonSchemaFileOpt = None,
) -> None:
    """Generate one completion of PROMPT and print it to stdout.

    With --json, print the text, token ids and per-step diagnostics (premature layer chosen,
    JSD per candidate layer, mature log-probability, entropy, Activation Decoding's entropy, risk)
    as one JSON object. With --abstain, print the answer only if its risk stays at most that
    (exit status 3 otherwise). With --grammar or --json-schema, the answer is text the grammar
    (or JSON the schema) allows, and it ends where that is complete.
    """
    m = load_model(model, ctx, threads, gpu_layers, repack, rpc)
    config = decode_config(m, **decode)
    grammar = constraint_grammar(m, grammar_file, json_schema_file)
    if grammar:
        config = config.replace(grammar=grammar)
    plan = layer_plan(m, decode["layers"])
    note_penalty(config, plan)
    text, templated = prompt_text(m, prompt, template, system)
    run = m.stream(text, max_tokens, config=config, stop=stop, abstain_above=abstain, stop_loops=stop_loops)
    if as_json:
        for _ in run:
            pass
        typer.echo(json.dumps(result_json(m, plan, run.result(), config, templated), indent=2))
        return
    if abstain is not None:  # the answer is shown only once it is known to stay below the risk
        for _ in run:
            pass
        r = run.result()
        if r.finish_reason == "abstained":
            typer.echo(f"abstained: the answer's risk reached {r.risk:.2f} (> {abstain:g})", err=True)
            raise typer.Exit(3)
        typer.echo(r.text)
        return
    for piece in run:
        typer.echo(piece, nl=False)
    typer.echo()


def result_json(model: Model, plan: LayerPlan, result: GenerationResult, config: DecodeConfig,
                templated: bool) -> dict:
    """Everything a generation reports; ``steps[i].jsd`` lines up with ``layers.candidates``."""
    return {
        "model": str(model.path),
        "template": "chat" if templated else "none",
        "layers": {"spec": config.dola.layers, "candidates": list(plan.candidates), "mature": plan.mature},
        "premature_norm": config.dola.premature_norm,
        "decoder": result.decoder,
        "alpha": config.activation.alpha if config.uses_activation else None,
        "info_layer": result.info_layer,
        "repetition_penalty": config.penalty(plan),
        "eos_boost": config.eos_boost,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "risk": None if result.risk is None else finite(result.risk),
        "prompt_tokens": result.prompt_tokens,
        "tokens": list(result.tokens),
        "prefill_seconds": result.prefill_seconds,
        "decode_seconds": result.decode_seconds,
        "tokens_per_second": result.tokens_per_second,
        "layer_histogram": {str(k): v for k, v in result.layer_histogram().items()},
        "steps": [
            {
                "token": s.token,
                "piece": model.detokenize([s.token]),
                "premature_layer": s.premature_layer,
                "jsd": [finite(x) for x in s.jsd],
                "mature_logprob": finite(s.mature_logprob),
                "confidence": finite(s.confidence),
                "entropy": finite(s.entropy),
                "activation_entropy": None if s.activation_entropy is None else finite(s.activation_entropy),
                "score": finite(s.score),
                "top_logprob": finite(s.top_logprob),
                "risk": finite(s.risk),
            }
            for s in result.steps
        ],
    }
