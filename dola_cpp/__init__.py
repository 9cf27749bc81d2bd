"""dola-cpp: DoLa (Decoding by Contrasting Layers) and factuality decoding for GGUF models,
on llama.cpp."""

try:
    from ._core import Cancelled, Error as DolaError
except ModuleNotFoundError as _e:  # the source folder imported without a build
    if _e.name != f"{__name__}._core":
        raise
    import os as _os

    raise ImportError(
        f"dola_cpp's compiled core (_core) is not in {_os.path.dirname(__file__)}: Python imported the "
        f"source folder, e.g. because it runs in the repository root. Install the package "
        f"(`pip install .`) and run from another folder, or build in place for development "
        f"(`pip install --no-build-isolation -e .`)."
    ) from None
from .hub import DEFAULT_MODEL, DEMO_MODELS, demo_model_path, resolve_model
from .layers import LayerPlan, resolve_layers
from .config import RECOMMENDED_REPETITION_PENALTY, ActivationConfig, DecodeConfig, DolaConfig
from .batch import Batch
from .constrain import JSON_OBJECT_GRAMMAR, json_schema_grammar
from .model import Model, PromptTooLongError
from .stream import PenaltyWarning, Stream
from .results import GenerationResult, ScoreResult, StepInfo

# The core's exception classes are defined in the extension as _core.Error and _core.Cancelled;
# they are this package's DolaError and Cancelled, and tracebacks and reprs say so.
for _cls, _name in ((DolaError, "DolaError"), (Cancelled, "Cancelled")):
    _cls.__name__ = _cls.__qualname__ = _name
    _cls.__module__ = __name__
del _cls, _name

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Cancelled",
    "DolaError",
    "DEFAULT_MODEL",
    "DEMO_MODELS",
    "DecodeConfig",
    "ActivationConfig",
    "DolaConfig",
    "GenerationResult",
    "JSON_OBJECT_GRAMMAR",
    "LayerPlan",
    "Model",
    "PenaltyWarning",
    "PromptTooLongError",
    "RECOMMENDED_REPETITION_PENALTY",
    "ScoreResult",
    "StepInfo",
    "Stream",
    "convert_model",
    "demo_model_path",
    "json_schema_grammar",
    "resolve_layers",
    "resolve_model",
]


def convert_model(src: str, dst: str, type: str = "F32", n_threads: int = 0) -> None:
    """Write a copy of a GGUF model with its tensors in ``type`` (F32, F16 or Q8_0), using
    llama.cpp's quantizer. An F32 copy is what reference-parity comparisons use."""
    from . import _core

    _core.convert_model(str(src), str(dst), type, n_threads)
