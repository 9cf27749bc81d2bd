"""Training-free risk: how likely a token, or an answer, is to be wrong.

Every decoding step already has the signals: the mature distribution's probability of the
emitted token, its top probability and entropy, and with dynamic DoLa the JSD between the mature
layer and the chosen premature layer. Each becomes a per-token risk in [0, 1]; an answer's risk
is the mean over its tokens (so long answers are not riskier for being long).

``risk`` itself is RISK_FORMULA (docs/evaluation.md, "Selective question answering", has the
selective-QA measurements it was chosen by).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np

from . import _core

# the signals selective QA compares, each a per-token risk in [0, 1] averaged over the answer:
# risk (1 - p_top), surprise (1 - p(token)), entropy (H / ln V), jsd (the premature layer's JSD / ln 2)
SIGNALS = ("risk", "surprise", "entropy", "jsd")

# low / medium / high: the chat's colours (--show-risk) and the trace's risk bars
RISK_BANDS = (0.3, 0.6)

RISK_FORMULA = "1 - p_top"  # p_top: the mature (final) layer's largest probability at that step


def token_risk(top_logprob: float) -> float:
    """The risk of one emitted token in [0, 1]: RISK_FORMULA, from the step's ``top_logprob``
    (which token the decoder then emits does not enter); the core's, which abstaining uses."""
    return _core.token_risk(float(top_logprob))


def answer_risk(token_risks: Iterable[float]) -> Optional[float]:
    """The risk of an answer: the mean of its tokens' risks (None for an empty answer)."""
    values = [float(r) for r in token_risks]
    return sum(values) / len(values) if values else None


def signal_risks(mature_logprob: np.ndarray, top_logprob: np.ndarray, entropy: np.ndarray, jsd: np.ndarray,
                 n_vocab: int) -> dict[str, float]:
    """Each signal's answer risk for an answer's per-token signals (arrays over its tokens)."""
    with np.errstate(invalid="ignore"):
        per_token = {
            "risk": np.array([token_risk(t) for t in top_logprob]),
            "surprise": 1.0 - np.exp(mature_logprob),
            "entropy": entropy / math.log(n_vocab),
            "jsd": jsd / math.log(2.0),
        }
    out = {}
    for name, v in per_token.items():
        v = np.asarray(v, dtype=np.float64)
        out[name] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out
