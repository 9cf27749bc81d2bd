"""The ``dola-cpp`` command line (``dola-cpp --help``)."""

from ._app import app, main

__all__ = ["app", "main"]
