"""``dola-cpp run``: chat in the terminal."""

from __future__ import annotations

import sys

import typer

from ._chat import Chat
from ._cli_utils import (
    AbstainOpt, AlphaOpt, CtxOpt, Decoder, DecoderOpt, EosBoostOpt, GpuLayersOpt, InfoLayerOpt, LayersOpt, MaxTokensOpt, ModelArg,
    PrematureNormOpt, RepackOpt, RpcOpt, RepetitionPenaltyOpt, SeedOpt, SystemOpt, TemperatureOpt, Template, TemplateOpt,
    ShowRiskOpt, ThreadsOpt, TopKOpt, TopPOpt, decode_config, examples, load_model,
    DryAllowedLengthOpt, DryBaseOpt, DryLastNOpt, DryMultiplierOpt, StopLoopsOpt,
)
from ..config import CHAT_DRY_MULTIPLIER, CHAT_EOS_BOOST, CHAT_MAX_TOKENS, CHAT_PREMATURE_NORM

RUN_EXAMPLES = examples(
    "dola-cpp run",
    "dola-cpp run smollm2 --layers high --repetition-penalty 1.2",
    "dola-cpp run model.gguf --layers 16,18,32 --system 'Answer briefly.'",
    "dola-cpp run smollm2 --decoder activation --layers none --alpha 0.5",
    "dola-cpp run smollm2 --show-risk --abstain 0.6",
    "dola-cpp run hf://owner/repo/model.Q4_K_M.gguf --ctx 4096",
    "printf 'What is the capital of France?\\n' | dola-cpp run smollm2",
)


def run(
    model: ModelArg = None,
    layers: LayersOpt = "high",
    repetition_penalty: RepetitionPenaltyOpt = None,
    premature_norm: PrematureNormOpt = CHAT_PREMATURE_NORM,
    decoder: DecoderOpt = Decoder.dola,
    alpha: AlphaOpt = 0.5,
    info_layer: InfoLayerOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = CHAT_MAX_TOKENS,
    eos_boost: EosBoostOpt = CHAT_EOS_BOOST,
    stop_loops: StopLoopsOpt = True,
    show_risk: ShowRiskOpt = False,
    abstain: AbstainOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    dry_multiplier: DryMultiplierOpt = CHAT_DRY_MULTIPLIER,
    dry_base: DryBaseOpt = 1.75,
    dry_allowed_length: DryAllowedLengthOpt = 2,
    dry_penalty_last_n: DryLastNOpt = -1,
    template: TemplateOpt = Template.auto,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    repack: RepackOpt = True,
    rpc: RpcOpt = None,
) -> None:
    """Chat with a model in the terminal, with DoLa decoding.

    Type /help in the chat for its commands (/set layers, /set decoder activation, /dola off,
    /stats, ...). Ctrl-C stops
    an answer; Ctrl-C at an empty prompt or Ctrl-D exits. With stdin not a terminal, each input
    line is a user turn and only the answers are printed.
    """
    m = load_model(model, ctx, threads, gpu_layers, repack, rpc)
    config = decode_config(m, layers=layers, repetition_penalty=repetition_penalty, premature_norm=premature_norm,
                           decoder=decoder, alpha=alpha, info_layer=info_layer, eos_boost=eos_boost,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           dry_multiplier=dry_multiplier, dry_base=dry_base, dry_allowed_length=dry_allowed_length,
                           dry_penalty_last_n=dry_penalty_last_n)
    chat = Chat(m, config, max_tokens=max_tokens, system=system, template=template, interactive=sys.stdin.isatty(),
                show_risk=show_risk, abstain=abstain, stop_loops=stop_loops)
    raise typer.Exit(chat.repl())
