"""``dola-cpp serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._cli_utils import CLIError, CtxOpt, GpuLayersOpt, ModelArg, RepackOpt, RpcOpt, ThreadsOpt, examples, load_model

SERVE_EXAMPLES = examples(
    "dola-cpp serve",
    "dola-cpp serve smollm2 --port 8000 --parallel 4",
    "dola-cpp serve model.gguf --host 0.0.0.0 --api-key $KEY",
    "curl localhost:8000/v1/chat/completions -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],"
    "\"dola_layers\":\"high\"}'",
)


def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    parallel: Annotated[int, typer.Option("--parallel", "-np", min=1, max=256,
                                          help="Generations at once (contexts on the loaded weights).")] = 1,
    queue: Annotated[Optional[int], typer.Option("--queue", min=0, show_default=False,
                                                 help="Requests that may wait for a context; beyond them "
                                                      "HTTP 503 (default: 4 x --parallel).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="DOLA_CPP_API_KEY", show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' on /v1/.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", show_default=False,
                                                help="The model id clients see (default: the file name).")] = None,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = -1,
    repack: RepackOpt = True,
    rpc: RpcOpt = None,
) -> None:
    """Serve a model over the OpenAI HTTP API, with DoLa.

    Serves MODEL's chat/completions, completions and models endpoints.
    DoLa and the other decoders are extra body fields: dola_layers, premature_norm, repetition_penalty,
    decoder, alpha, info_layer, eos_boost, risk. Needs the server extra: pip install 'dola-cpp[server]'.
    """
    try:
        import uvicorn

        from ..server import create_app
    except ModuleNotFoundError as e:
        raise CLIError(f"serve needs {e.name}: pip install 'dola-cpp[server]'") from None
    m = load_model(model, ctx, threads, gpu_layers, repack, rpc)
    app = create_app(m, parallel=parallel, max_queue=queue, api_key=api_key, model_name=name)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        typer.echo(f"note: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    typer.echo(f"serving {name or m.path.name} on http://{host}:{port}/v1 ({parallel} at once)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
