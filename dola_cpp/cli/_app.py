"""The ``dola-cpp`` application: wiring only; each command lives in its own module."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import __version__
from ._cli_utils import DEBUG_ENV, DolaCommand, DolaGroup
from .compare import COMPARE_EXAMPLES, compare
from .generate import GENERATE_EXAMPLES, generate
from .info import INFO_EXAMPLES, info
from .pull import PULL_EXAMPLES, pull
from .rpc_server import RPC_SERVER_EXAMPLES, rpc_server
from .run import RUN_EXAMPLES, run
from .serve import SERVE_EXAMPLES, serve
from .trace import TRACE_EXAMPLES, trace

try:  # the eval commands are optional: skip them only when their module does not exist
    from .eval import app as eval_app
except ModuleNotFoundError as e:
    if e.name != f"{__package__}.eval":
        raise
    eval_app = None

app = typer.Typer(
    name="dola-cpp",
    help="DoLa (Decoding by Contrasting Layers) for GGUF models on llama.cpp.",
    epilog=f"Set {DEBUG_ENV}=1 to see full tracebacks.",
    cls=DolaGroup,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    # help pages use up to 100 columns of a wide terminal (click's default stops at 80)
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dola-cpp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
) -> None:
    pass


# The root help lists each command with the first sentence of its docstring: keep it short and whole.
app.command(cls=DolaCommand, epilog=RUN_EXAMPLES)(run)
app.command(cls=DolaCommand, epilog=GENERATE_EXAMPLES)(generate)
app.command(cls=DolaCommand, epilog=COMPARE_EXAMPLES)(compare)
app.command(cls=DolaCommand, epilog=TRACE_EXAMPLES)(trace)
app.command(cls=DolaCommand, epilog=SERVE_EXAMPLES)(serve)
app.command(cls=DolaCommand, epilog=INFO_EXAMPLES)(info)
app.command("rpc-server", cls=DolaCommand, epilog=RPC_SERVER_EXAMPLES)(rpc_server)
app.command(cls=DolaCommand, epilog=PULL_EXAMPLES)(pull)
if eval_app is not None:
    app.add_typer(eval_app, name="eval")


def main() -> None:
    app(prog_name="dola-cpp")
