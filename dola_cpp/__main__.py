"""``python -m dola_cpp``: the ``dola-cpp`` command line."""

from .cli import main

main()
