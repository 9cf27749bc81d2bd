"""``dola-cpp serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from ..model import DEFAULT_CACHE_MIB
from ._cli_utils import CLIError, CtxOpt, GpuLayersOpt, ModelArg, RepackOpt, RpcOpt, ThreadsOpt, examples, load_model

# the server's defaults, without importing the server (its extra may be missing)
DEFAULT_MAX_BODY, HEADER_TIMEOUT, IDLE_TIMEOUT = 8 * 2**20, 10.0, 5.0

SERVE_EXAMPLES = examples(
    "dola-cpp serve",
    "dola-cpp serve smollm2 --port 8000 --parallel 4",
    "dola-cpp serve model.gguf --host 0.0.0.0 --api-key $KEY",
    "dola-cpp serve smollm2 --dola-layers high",
    "curl localhost:8000/v1/chat/completions -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],"
    "\"dola_layers\":\"high\"}'",
)


def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    parallel: Annotated[int, typer.Option("--parallel", "-np", min=1, max=256,
                                          help="Generations at once: sequences of one context, decoded together "
                                               "(continuous batching; the KV cache holds this many times "
                                               "--ctx).")] = 4,
    queue: Annotated[Optional[int], typer.Option("--queue", min=0, show_default=False,
                                                 help="Requests that may wait for a sequence; beyond them "
                                                      "HTTP 503 (default: 4 x --parallel).")] = None,
    cache_ram: Annotated[float, typer.Option("--cache-ram", min=0, max=2**20, metavar="MIB",
                                             help="Host memory for earlier prompts' KV cells: a request "
                                                  "that begins like one (a chat's next turn, a question "
                                                  "asked again) skips decoding that part; 0: off.")]
    = DEFAULT_CACHE_MIB,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="DOLA_CPP_API_KEY", show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' on /v1/.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", show_default=False,
                                                help="The model id clients see (default: the file name).")] = None,
    alias: Annotated[Optional[list[str]], typer.Option("--alias", show_default=False, metavar="NAME",
                                                       help="Another model id /v1/models lists (repeatable, or "
                                                            "names with commas). Requests may name any model: "
                                                            "the loaded one answers.")] = None,
    max_body: Annotated[int, typer.Option("--max-body", min=1024, metavar="BYTES",
                                          help="Largest request body; beyond it HTTP 413.")] = DEFAULT_MAX_BODY,
    header_timeout: Annotated[float, typer.Option("--header-timeout", min=0.001, metavar="SECONDS",
                                                  help="Close a connection whose request headers have not "
                                                       "arrived by then.")] = HEADER_TIMEOUT,
    idle_timeout: Annotated[float, typer.Option("--idle-timeout", min=0.001, metavar="SECONDS",
                                                help="Close an idle keep-alive connection after this.")] = IDLE_TIMEOUT,
    dola_layers: Annotated[Optional[str], typer.Option("--dola-layers", show_default=False, metavar="LAYERS",
                                                       help="The layers of requests that leave dola_layers out "
                                                            "(high, low, 16,18,32): DoLa for clients that cannot "
                                                            "send dola-cpp's fields (default: plain).")] = None,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    repack: RepackOpt = True,
    rpc: RpcOpt = None,
) -> None:
    """Serve a model over the OpenAI HTTP API, with DoLa.

    Serves MODEL's chat/completions, completions and models endpoints, /metrics, and /tokenize, /detokenize.
    DoLa and the other decoders are extra body fields: dola_layers, premature_norm, repetition_penalty,
    decoder, alpha, info_layer, eos_boost, dry_multiplier, stop_loops, risk; unset, they decode as the
    chat does. Needs the server extra: pip install 'dola-cpp[server]'.
    """
    try:
        import uvicorn

        from ..server import create_app, server_config
    except ModuleNotFoundError as e:
        raise CLIError(f"serve needs {e.name}: pip install 'dola-cpp[server]'") from None
    if api_key is None and os.environ.get("DOLA_CPP_API_KEY") is not None:
        api_key = os.environ["DOLA_CPP_API_KEY"]  # set but empty: click reads it as unset
    if api_key is not None and not api_key.strip():
        raise CLIError("--api-key is empty (or DOLA_CPP_API_KEY is set to nothing): give a key, or leave it out")
    aliases = [a.strip() for given in alias or () for a in given.split(",") if a.strip()]
    m = load_model(model, ctx, threads, gpu_layers, repack, rpc)
    try:
        app = create_app(m, parallel=parallel, max_queue=queue, api_key=api_key, model_name=name, max_body=max_body,
                         aliases=aliases, defaults={"dola_layers": dola_layers} if dola_layers else None,
                         cache_mib=cache_ram)
    except ValueError as e:
        raise CLIError(f"--dola-layers: {e}") from None
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        typer.echo(f"note: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    typer.echo(f"serving {name or m.path.name} on http://{host}:{port}/v1 ({parallel} at once)", err=True)
    uvicorn.Server(server_config(app, host, port, header_timeout=header_timeout, idle_timeout=idle_timeout)).run()
