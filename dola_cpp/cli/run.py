"""``dola-cpp run``: chat in the terminal."""

from __future__ import annotations

import sys

import typer

from ._chat import Chat
from ..settings import CHAT_MAX_TOKENS
from ._cli_utils import (
    DECODE_OPTIONS, AbstainOpt, CtxOpt, DecodeOptions, GpuLayersOpt, MaxTokensOpt, ModelArg, RepackOpt, RpcOpt,
    ShowRiskOpt, StopLoopsOpt, SystemOpt, Template, TemplateOpt, ThreadsOpt, decode_config, decode_options, examples,
    load_model,
)

RUN_EXAMPLES = examples(
    "dola-cpp run",
    "dola-cpp run smollm2 --layers high --repetition-penalty 1.2",
    "dola-cpp run model.gguf --layers 16,18,32 --system 'Answer briefly.'",
    "dola-cpp run smollm2 --decoder activation --layers none --alpha 0.5",
    "dola-cpp run smollm2 --show-risk --abstain 0.6",
    "dola-cpp run hf://owner/repo/model.Q4_K_M.gguf --ctx 4096",
    "printf 'What is the capital of France?\\n' | dola-cpp run smollm2",
)


@decode_options("run")
def run(
    model: ModelArg = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = CHAT_MAX_TOKENS,
    decode: DecodeOptions = DECODE_OPTIONS,  # the table's options for run, the chat's defaults (dola_cpp.settings)
    stop_loops: StopLoopsOpt = True,
    show_risk: ShowRiskOpt = False,
    abstain: AbstainOpt = None,
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
    config = decode_config(m, **decode)
    chat = Chat(m, config, max_tokens=max_tokens, system=system, template=template, interactive=sys.stdin.isatty(),
                show_risk=show_risk, abstain=abstain, stop_loops=stop_loops)
    raise typer.Exit(chat.repl())
