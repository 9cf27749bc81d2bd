"""``dola-cpp rpc-server``: ggml's RPC server, in this process."""

from __future__ import annotations

import os
import signal
from typing import Annotated, Optional

import typer

from ._cli_utils import CLIError, examples

RPC_SERVER_EXAMPLES = examples(
    "dola-cpp rpc-server --port 50052",
    "dola-cpp rpc-server --host 0.0.0.0 --port 50052 --threads 8   # on each helper machine",
    "dola-cpp run model.gguf --rpc 192.168.1.10:50052,192.168.1.11:50052   # on the main one",
)


def rpc_server(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. The protocol has no authentication: "
                                                     "listen beyond 127.0.0.1 only on a trusted network.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="TCP port.")] = 50052,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, show_default=False,
                                                   help="CPU threads when serving the CPU (default: all cores).")]
    = None,
    cache: Annotated[Optional[str], typer.Option("--cache", metavar="DIR", show_default=False,
                                                 help="A folder where the server caches tensors it received, so a "
                                                      "reload of the same model is fast.")] = None,
) -> None:
    """Serve this machine's GPUs or CPU over ggml's RPC protocol.

    Other machines' dola-cpp or llama.cpp (--rpc HOST:PORT) then run model layers on this machine's
    devices (its GPUs, else the CPU), until the server is stopped (Ctrl-C)."""
    from .. import _core

    if not _core.rpc_available():
        raise CLIError("this build of dola-cpp has no RPC backend (build with -DGGML_RPC=ON)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"note: listening on {host}: anyone who can reach this port can run computations here", err=True)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the server loop runs in C: Ctrl-C ends the process
    _core.rpc_serve(host, port, threads or os.cpu_count() or 1, cache or "")
