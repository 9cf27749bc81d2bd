"""Result types returned by :class:`dola_cpp.Model`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class StepInfo:
    """Diagnostics of one generated token."""

    token: int
    premature_layer: Optional[int]  # None for plain decoding
    jsd: np.ndarray  # JSD(mature || candidate) per candidate layer; empty for static DoLa / plain
    mature_logprob: float  # log p(token) under the mature layer
    score: float  # processed score of the token (after the contrast and repetition penalty)
    entropy: float  # entropy of the mature distribution (nats)
    # Activation Decoding: H of the token, the entropy over the prompt's positions of its
    # info-layer probability (nats; lower = sharper); None for other decoders
    activation_entropy: Optional[float] = None

    @property
    def confidence(self) -> float:
        """Mature-layer probability of the emitted token: a training-free risk signal."""
        return float(np.exp(self.mature_logprob))


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: list[int]
    steps: list[StepInfo]
    finish_reason: str  # "stop" (EOS/EOT or a stop string), "length", "cancelled", "interrupted"
    prompt_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    layers: tuple[int, ...] = ()
    mature_layer: Optional[int] = None
    decoder: str = "plain"  # plain, dola, activation or activation_dola
    info_layer: Optional[int] = None  # Activation Decoding's info layer

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def layer_histogram(self) -> dict[int, int]:
        """How often each premature layer was chosen."""
        hist: dict[int, int] = {layer: 0 for layer in self.layers}
        for s in self.steps:
            if s.premature_layer is not None:
                hist[s.premature_layer] = hist.get(s.premature_layer, 0) + 1
        return hist


@dataclass(frozen=True)
class ScoreResult:
    """Teacher-forced score of a continuation (the DoLa repo's ``lm_score``)."""

    score: float
    token_scores: np.ndarray
    premature_layers: list[Optional[int]] = field(default_factory=list)
    continuation_tokens: list[int] = field(default_factory=list)
