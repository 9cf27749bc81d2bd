"""dola-cpp: DoLa (Decoding by Contrasting Layers) and factuality decoding for GGUF models,
on llama.cpp."""

from ._core import Cancelled, Error as DolaError
from .hub import DEFAULT_MODEL, DEMO_MODELS, demo_model_path, resolve_model
from .layers import LayerPlan, resolve_layers
from .model import RECOMMENDED_REPETITION_PENALTY, Model, PenaltyWarning
from .results import GenerationResult, ScoreResult, StepInfo

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "DolaError",
    "DEFAULT_MODEL",
    "DEMO_MODELS",
    "GenerationResult",
    "LayerPlan",
    "Model",
    "PenaltyWarning",
    "RECOMMENDED_REPETITION_PENALTY",
    "ScoreResult",
    "StepInfo",
    "convert_model",
    "demo_model_path",
    "resolve_layers",
    "resolve_model",
]


def convert_model(src: str, dst: str, type: str = "F32", n_threads: int = 0) -> None:
    """Write a copy of a GGUF model with its tensors in ``type`` (F32, F16 or Q8_0), using
    llama.cpp's quantizer. An F32 copy is what reference-parity comparisons use."""
    from . import _core

    _core.convert_model(str(src), str(dst), type, n_threads)
