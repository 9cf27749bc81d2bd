"""Result types returned by :class:`dola_cpp.Model`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


def finite(x: float) -> Optional[float]:
    """``x`` as a float for JSON, which has no inf/nan: those become None (null)."""
    x = float(x)
    return x if math.isfinite(x) else None


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
    top_logprob: float = 0.0  # log of the mature distribution's largest probability
    risk: float = float("nan")  # the token's risk in [0, 1] (dola_cpp.risk.token_risk)
    # with top_logprobs=n (else empty / None): the mature distribution's n most probable tokens as
    # (id, log-prob), best first; the token's log-prob in the distribution it was chosen from (the
    # log-softmax of the processed scores: after the contrast, penalties, bias and grammar, before
    # temperature; the mature one, penalties aside, for plain decoding) and that distribution's n
    # best (only tokens it allows: fewer when it allows fewer)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    dola_logprob: Optional[float] = None
    dola_top_logprobs: list[tuple[int, float]] = field(default_factory=list)

    @property
    def confidence(self) -> float:
        """Mature-layer probability of the emitted token: a training-free risk signal."""
        return float(np.exp(self.mature_logprob))


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: list[int]
    steps: list[StepInfo]
    # "stop" (an end-of-generation token or a stop string), "length", "abstained" (the running
    # risk crossed abstain_above), "loop" (stop_loops: the answer repeated a cycle of tokens),
    # "cancelled", "interrupted"
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    layers: tuple[int, ...] = ()
    mature_layer: Optional[int] = None
    decoder: str = "plain"  # plain, dola, activation or activation_dola
    info_layer: Optional[int] = None  # Activation Decoding's info layer
    risk: Optional[float] = None  # the answer's risk: the mean of its tokens' (None when empty; 1 when it looped)
    loop: int = 0  # finish_reason "loop": the length of the cycle the answer repeated

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
    # per continuation token, what a generation step would report for it (the risk signals):
    # log p_mature(token), the mature distribution's top log-probability and entropy (nats), and
    # the premature layer's JSD (NaN for plain and static DoLa)
    mature_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    top_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    entropies: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    jsd: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    # with top_logprobs=n (else empty): per continuation token, the mature distribution's n most
    # probable tokens as (id, log-prob), best first
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)
