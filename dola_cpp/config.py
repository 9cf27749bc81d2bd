"""DecodeConfig: the settings one generation decodes with, their defaults and their rules.

Like transformers' ``GenerationConfig``: frozen, validated when made (``validate``), and the one
place that knows the defaults that depend on the layer plan (the repetition penalty) and when
to warn about them. Each decoder's settings are a sub-config (``DolaConfig``,
``ActivationConfig``). ``Model.generate``/``stream`` take one (``config=``) and/or the same
fields as keywords; the command line builds one from its options and the chat's ``/set``
replaces fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from . import _core
from .layers import LayerPlan, LayerSpec, default_info_layer, parse_layer_string

RECOMMENDED_REPETITION_PENALTY = 1.2
INT32_MAX = 2**31 - 1
EOS_BOOST_START = 0.8  # eos_boost acts from this share of the token budget on
DECODERS = ("dola", "activation")

# What the chat (``dola-cpp run``) and the server decode with unless told otherwise, chosen with
# benchmarks/chat_defaults.py (README, "Chat defaults"): premature layers through the final norm,
# an end-of-answer boost near the token budget, llama.cpp's DRY sampler against loops, and a stop
# when the answer repeats a cycle anyway.
CHAT_PREMATURE_NORM = True
CHAT_EOS_BOOST = 10.0
CHAT_DRY_MULTIPLIER = 0.8
CHAT_MAX_TOKENS = 512
# llama-server's: DRY does not follow a repeat across them
DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")


@dataclass(frozen=True)
class DolaConfig:
    """Which layers DoLa contrasts, and how.

    ``layers``: None = plain decoding; ``"high"``, ``"low"``, a list of premature layers, or the
    DoLa repo's early-exit string ``"16,18,32"`` (one value = plain decoding from that layer, two =
    static DoLa, more = dynamic DoLa whose last value is the mature layer).
    ``premature_norm``: False = project the raw hidden state (the paper, transformers); True =
    the final norm first (logit lens). ``relative_top``: DoLa's relative-top filter.
    """

    layers: LayerSpec = None
    premature_norm: bool = False
    relative_top: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            parse_layer_string(self.layers)
        elif self.layers is not None and (isinstance(self.layers, (bytes, bytearray))
                                          or not all(_is_int(v) for v in self.layers)):
            raise TypeError(f"layers must be 'low', 'high', a layer string or a sequence of ints, got {self.layers!r}")
        if not isinstance(self.premature_norm, bool):
            raise TypeError(f"premature_norm must be True or False, got {self.premature_norm!r}")
        _check_number("relative_top", self.relative_top, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class ActivationConfig:
    """Activation Decoding's settings (used when ``DecodeConfig.decoder == "activation"``).

    ``alpha``: weight of the sharpness term (the reference's TruthfulQA setting, 0.5).
    ``info_layer``: the layer whose early exit gives the context activations; None = per model,
    round(0.8 * N) (the reference's 26 of 32 for Llama-2-7B).
    """

    alpha: float = 0.5
    info_layer: Optional[int] = None

    def __post_init__(self) -> None:
        _check_number("alpha", self.alpha, 0.0, None)
        if self.info_layer is not None and (not _is_int(self.info_layer) or self.info_layer < 0):
            raise ValueError(f"info_layer must be a layer number >= 0 or None (per model), got {self.info_layer!r}")

    def resolve_info_layer(self, n_layer: int) -> int:
        """The info layer for an ``n_layer``-layer model; ValueError when out of range."""
        if self.info_layer is None:
            return default_info_layer(n_layer)
        if not 0 <= self.info_layer < n_layer:
            raise ValueError(f"info_layer {self.info_layer} is out of range: valid layers are 0..{n_layer - 1} "
                             f"for this {n_layer}-layer model")
        return int(self.info_layer)


@dataclass(frozen=True)
class DecodeConfig:
    """How the next token is chosen: the decoder, its settings (``dola``, a :class:`DolaConfig`;
    ``activation``, an :class:`ActivationConfig`) and the logits processors and sampler after it.

    ``decoder``: ``"dola"`` (plain decoding when ``layers`` is None) or ``"activation"``
    (Activation Decoding; with ``layers`` set, Activation Decoding on top of DoLa's contrast:
    the reference's ``activation_dola``).

    ``repetition_penalty``: None = 1.2 with DoLa or Activation Decoding, 1.0 plain or with DRY
    (``dry_multiplier`` > 0).
    ``eos_boost`` (nats, 0 = off): from EOS_BOOST_START of the token budget on, every
    end-of-generation token's score gains a bonus rising linearly to ``eos_boost`` at the last
    token (an end-of-answer logits bonus, made gradual; ``eos_bonus``). It acts after the
    contrast and the penalty, and an end token the relative-top filter removed re-enters as far
    below the best score as the mature distribution has it below its top token.
    ``temperature`` 0 = greedy; then ``top_k`` (0 = all), ``top_p``, ``min_p``, ``seed`` (None =
    random). ``dry_multiplier`` (0 = off), ``dry_base``, ``dry_allowed_length``,
    ``dry_penalty_last_n`` (-1 = the whole context): llama.cpp's DRY sampler, which lowers a token
    that would extend a sequence the context already holds by ``dry_multiplier *
    dry_base ** (length - dry_allowed_length)``, after the repetition penalty (llama-server's
    names and defaults; the chat and the server turn it on). ``replace`` takes the
    sub-configs' fields by name too: ``DecodeConfig().replace(layers="high", temperature=0.7)``.
    """

    dola: DolaConfig = field(default_factory=DolaConfig)
    decoder: str = "dola"
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    repetition_penalty: Optional[float] = None
    eos_boost: float = 0.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = DRY_SEQUENCE_BREAKERS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the field for a value no model could decode with
        (layer ranges are checked against the model when it resolves the layers)."""
        if not isinstance(self.dola, DolaConfig):
            raise TypeError(f"dola must be a DolaConfig, got {type(self.dola).__name__}")
        if not isinstance(self.activation, ActivationConfig):
            raise TypeError(f"activation must be an ActivationConfig, got {type(self.activation).__name__}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.repetition_penalty is not None:
            _check_number("repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True)
        _check_number("eos_boost", self.eos_boost, 0.0, None)
        _check_number("temperature", self.temperature, 0.0, None)
        if not _is_int(self.top_k) or not 0 <= self.top_k <= INT32_MAX:
            raise ValueError(f"top_k must be an integer >= 0 and <= {INT32_MAX} (0 = all tokens), got {self.top_k!r}")
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("dry_multiplier", self.dry_multiplier, 0.0, None)
        _check_number("dry_base", self.dry_base, 1.0, None)
        if not _is_int(self.dry_allowed_length) or not 0 <= self.dry_allowed_length <= INT32_MAX:
            raise ValueError(f"dry_allowed_length must be an integer >= 0, got {self.dry_allowed_length!r}")
        if not _is_int(self.dry_penalty_last_n) or not -1 <= self.dry_penalty_last_n <= INT32_MAX:
            raise ValueError(f"dry_penalty_last_n must be an integer >= -1 (-1 = the whole context, 0 = off), "
                             f"got {self.dry_penalty_last_n!r}")
        if isinstance(self.dry_sequence_breakers, str) or not all(
                isinstance(b, str) and 0 < len(b.encode("utf-8", "surrogatepass")) <= 40 and "\0" not in b
                for b in self.dry_sequence_breakers):
            raise ValueError(f"dry_sequence_breakers must be a sequence of strings of 1 to 40 bytes without NUL, "
                             f"got {self.dry_sequence_breakers!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None (random), got {self.seed!r}")

    def replace(self, **changes: Any) -> "DecodeConfig":
        """A copy with ``changes``, the sub-configs' fields included; an unknown name is a
        TypeError that suggests the right one."""
        for name in changes:
            if name not in FIELDS:
                close = difflib.get_close_matches(name, FIELDS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"DecodeConfig has no field {name!r}{hint} (fields: {', '.join(FIELDS)})")
        dola = {k: changes.pop(k) for k in list(changes) if k in DOLA_FIELDS}
        if dola:
            changes["dola"] = dataclasses.replace(changes.get("dola", self.dola), **dola)
        act = {k: changes.pop(k) for k in list(changes) if k in ACTIVATION_FIELDS}
        if act:
            changes["activation"] = dataclasses.replace(changes.get("activation", self.activation), **act)
        return dataclasses.replace(self, **changes)

    @property
    def uses_activation(self) -> bool:
        return self.decoder == "activation"

    def decoder_name(self, plan: LayerPlan) -> str:
        """The reference's name for what this config runs: plain, dola, activation, activation_dola."""
        if self.uses_activation:
            return "activation" if plan.is_plain else "activation_dola"
        return "plain" if plan.is_plain else "dola"

    def penalty(self, plan: LayerPlan) -> float:
        """The repetition penalty this config decodes ``plan`` with."""
        if self.repetition_penalty is not None:
            return float(self.repetition_penalty)
        # the DoLa and Activation Decoding repositories generate with 1.2; plain decoding with 1.0,
        # and so does DoLa with DRY, which guards against repeats without penalising every token
        # the prompt holds (the chat template's system text included: "Hi" then drifts into emoji
        # bytes on SmolLM2; README, "Chat defaults")
        if (plan.is_plain and not self.uses_activation) or self.dry_multiplier > 0:
            return 1.0
        return RECOMMENDED_REPETITION_PENALTY

    def eos_bonus(self, step: int, budget: int) -> float:
        """What ``eos_boost`` adds to the end tokens' scores when choosing token ``step`` (0-based)
        of a ``budget``-token answer: 0 before EOS_BOOST_START of the budget, then ``eos_boost * r``
        with r rising linearly to 1 at the last token."""
        if self.eos_boost <= 0 or budget <= 0:
            return 0.0
        start = math.floor(EOS_BOOST_START * budget)
        if step < start:
            return 0.0
        r = (step - start + 1) / (budget - start)
        return float(self.eos_boost) * min(1.0, r)

    def penalty_note(self, plan: LayerPlan) -> Optional[str]:
        """Why DoLa with this penalty may repeat itself, or None."""
        p = self.penalty(plan)
        if plan.is_plain or p >= RECOMMENDED_REPETITION_PENALTY or self.dry_multiplier > 0:
            return None
        return (f"DoLa decoding is recommended with repetition_penalty >= {RECOMMENDED_REPETITION_PENALTY} "
                f"(got {p:g}); answers may repeat themselves")

    def to_core(self, plan: LayerPlan, n_layer: int) -> _core.DecodeParams:
        """The C++ core's mirror of this config, for a resolved layer plan of an ``n_layer``-layer
        model."""
        p = _core.DecodeParams()
        p.candidates = list(plan.candidates)
        p.mature = plan.mature
        p.relative_top = float(self.dola.relative_top)
        p.repetition_penalty = self.penalty(plan)
        p.premature_norm = self.dola.premature_norm
        p.activation = self.uses_activation
        p.alpha = float(self.activation.alpha)
        p.info_layer = self.activation.resolve_info_layer(n_layer) if self.uses_activation else -1
        p.temperature = float(self.temperature)
        p.top_k = int(self.top_k)
        p.top_p = float(self.top_p)
        p.min_p = float(self.min_p)
        p.seed = 0xFFFFFFFF if self.seed is None else int(self.seed) & 0xFFFFFFFF
        p.dry_multiplier = float(self.dry_multiplier)
        p.dry_base = float(self.dry_base)
        p.dry_allowed_length = int(self.dry_allowed_length)
        p.dry_penalty_last_n = int(self.dry_penalty_last_n)
        p.dry_sequence_breakers = list(self.dry_sequence_breakers)
        return p


DOLA_FIELDS = [f.name for f in dataclasses.fields(DolaConfig)]
ACTIVATION_FIELDS = [f.name for f in dataclasses.fields(ActivationConfig)]
FIELDS = [f.name for f in dataclasses.fields(DecodeConfig)] + DOLA_FIELDS + ACTIVATION_FIELDS


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) or type(v).__name__ in ("int64", "int32", "int16", "int8")


def _check_number(name: str, value: Any, low: float, high: Optional[float], low_open: bool = False,
                  high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        if not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        lower = f"{'>' if low_open else '>='} {low:g}"
        if high is None:  # "temperature must be >= 0, got -1"
            raise ValueError(f"{name} must be {lower}, got {value!r}")
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
