"""DecodeConfig: the settings one generation decodes with, their defaults and their rules (each
field's default, range and meaning are its row in ``dola_cpp.settings``).

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
from typing import Any, Mapping, Optional

from . import _core
from .constrain import JsonSchema, json_schema_grammar
from .layers import LayerPlan, LayerSpec, default_info_layer, parse_layer_string
from .settings import (  # noqa: F401  (the constants, where they have always been imported from)
    BY_NAME, CHAT_DRY_MULTIPLIER, CHAT_EOS_BOOST, CHAT_MAX_TOKENS, CHAT_PREMATURE_NORM, DECODERS,
    DRY_SEQUENCE_BREAKERS, INT32_MAX, LOGIT_BIAS_MAX, RECOMMENDED_REPETITION_PENALTY, SETTINGS, Setting, default,
)

EOS_BOOST_START = 0.8  # eos_boost acts from this share of the token budget on


@dataclass(frozen=True)
class DolaConfig:
    """Which layers DoLa contrasts, and how.

    ``layers``: None = plain decoding; ``"high"``, ``"low"``, a list of premature layers, or the
    DoLa repo's early-exit string ``"16,18,32"`` (one value = plain decoding from that layer, two =
    static DoLa, more = dynamic DoLa whose last value is the mature layer).
    ``premature_norm``: False = project the raw hidden state (the paper, transformers); True =
    the final norm first (logit lens). ``relative_top``: DoLa's relative-top filter.
    """

    layers: LayerSpec = default("layers")
    premature_norm: bool = default("premature_norm")
    relative_top: float = default("relative_top")

    def __post_init__(self) -> None:
        _check_fields(self, "dola")


@dataclass(frozen=True)
class ActivationConfig:
    """Activation Decoding's settings (used when ``DecodeConfig.decoder == "activation"``).

    ``alpha``: weight of the sharpness term (the reference's TruthfulQA setting, 0.5).
    ``info_layer``: the layer whose early exit gives the context activations; None = per model,
    round(0.8 * N) (the reference's 26 of 32 for Llama-2-7B).
    """

    alpha: float = default("alpha")
    info_layer: Optional[int] = default("info_layer")

    def __post_init__(self) -> None:
        _check_fields(self, "activation")

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
    names and defaults; the chat and the server turn it on). ``frequency_penalty`` and
    ``presence_penalty`` (OpenAI's, -2..2): a token's score loses ``frequency_penalty`` per time
    it occurs in the answer so far and ``presence_penalty`` once if it does (the generated
    tokens only, not the prompt), after DRY. ``logit_bias`` (OpenAI's): ``{token id: bias}``,
    each bias in [-100, 100] added to that token's score last (-100 bans it, 100 forces it; a
    token the relative-top filter removed re-enters for a positive bias as the end tokens do
    for ``eos_boost``); held as a new dict with int keys, the ids are checked against the model's vocabulary when
    decoding starts. ``grammar``: GBNF text (llama.cpp's grammar format, start rule ``root``;
    "" = none): each token is chosen among those the grammar allows, after the penalties, DRY,
    the end bonus and the bias; once the text is complete only the end-of-generation tokens are
    allowed, so the answer ends there (``dola_cpp.json_schema_grammar`` makes one from a JSON
    schema). ``top_logprobs`` (0..20): each step reports the mature distribution's n most
    probable tokens with their log-probs, the chosen token's log-prob in the distribution it was
    chosen from (the processed scores' log-softmax, before temperature) and that distribution's n
    best (``StepInfo``). ``replace`` takes the
    sub-configs' fields by name too: ``DecodeConfig().replace(layers="high", temperature=0.7)``.
    """

    dola: DolaConfig = field(default_factory=DolaConfig)
    decoder: str = default("decoder")
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    repetition_penalty: Optional[float] = default("repetition_penalty")
    eos_boost: float = default("eos_boost")
    temperature: float = default("temperature")
    top_k: int = default("top_k")
    top_p: float = default("top_p")
    min_p: float = default("min_p")
    seed: Optional[int] = default("seed")
    dry_multiplier: float = default("dry_multiplier")
    dry_base: float = default("dry_base")
    dry_allowed_length: int = default("dry_allowed_length")
    dry_penalty_last_n: int = default("dry_penalty_last_n")
    dry_sequence_breakers: tuple[str, ...] = default("dry_sequence_breakers")
    frequency_penalty: float = default("frequency_penalty")
    presence_penalty: float = default("presence_penalty")
    logit_bias: Mapping[int, float] = field(default_factory=lambda: dict(default("logit_bias")), hash=False)
    grammar: str = default("grammar")
    top_logprobs: int = default("top_logprobs")

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_bias", _bias_map(self.logit_bias))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the field for a value no model could decode with
        (layer ranges are checked against the model when it resolves the layers): each field
        against its row in ``dola_cpp.settings``."""
        if not isinstance(self.dola, DolaConfig):
            raise TypeError(f"dola must be a DolaConfig, got {type(self.dola).__name__}")
        if not isinstance(self.activation, ActivationConfig):
            raise TypeError(f"activation must be an ActivationConfig, got {type(self.activation).__name__}")
        _check_fields(self, "")

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
        # bytes on SmolLM2; docs/decoders.md, "Chat defaults")
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
        for s in SETTINGS:  # the settings the core takes as they are (settings.Setting.derived)
            if not s.derived and s.core_members:
                value = getattr(getattr(self, s.group) if s.group else self, s.name)
                setattr(p, s.core_members[0], list(value) if s.type is tuple else value if s.type is bool else s.type(value))
        p.candidates = list(plan.candidates)
        p.mature = plan.mature
        p.repetition_penalty = self.penalty(plan)
        p.activation = self.uses_activation
        p.info_layer = self.activation.resolve_info_layer(n_layer) if self.uses_activation else -1
        p.seed = 0xFFFFFFFF if self.seed is None else int(self.seed) & 0xFFFFFFFF
        return p


DOLA_FIELDS = [f.name for f in dataclasses.fields(DolaConfig)]
ACTIVATION_FIELDS = [f.name for f in dataclasses.fields(ActivationConfig)]
FIELDS = [f.name for f in dataclasses.fields(DecodeConfig)] + DOLA_FIELDS + ACTIVATION_FIELDS


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) or type(v).__name__ in ("int64", "int32", "int16", "int8")


def _bias_map(value: Any) -> dict[int, Any]:
    """``logit_bias`` as a new {token id: bias}: the ids integers (or their text, as JSON
    object keys are) in the core's int range, the biases as given (``_check_setting`` checks them)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"logit_bias must be a mapping of token ids to biases, got {value!r}")
    out: dict[int, Any] = {}
    for k, b in value.items():
        t = int(k.strip()) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k
        if not _is_int(t) or not -2**31 <= t <= INT32_MAX:
            raise ValueError(f"logit_bias keys must be token ids (integers), got {k!r}")
        out[int(t)] = b
    return out


def _check_fields(config: Any, group: str) -> None:
    """Check each field of ``config`` (the sub-config ``group``, or DecodeConfig's own fields for
    "") against its setting, in the dataclass's order."""
    for f in dataclasses.fields(config):
        s = BY_NAME.get(f.name)
        if s is not None and s.group == group:
            _check_setting(s, getattr(config, f.name))


def _check_setting(s: Setting, value: Any) -> None:
    if s.name == "layers":
        if isinstance(value, str):
            parse_layer_string(value)
        elif value is not None and (isinstance(value, (bytes, bytearray)) or not all(_is_int(v) for v in value)):
            raise TypeError(f"layers must be 'low', 'high', a layer string or a sequence of ints, got {value!r}")
    elif s.name == "dry_sequence_breakers":
        if isinstance(value, str) or not all(
                isinstance(b, str) and 0 < len(b.encode("utf-8", "surrogatepass")) <= 40 and "\0" not in b
                for b in value):
            raise ValueError(f"dry_sequence_breakers must be a sequence of strings of 1 to 40 bytes without NUL, "
                             f"got {value!r}")
    elif s.name == "logit_bias":
        for t, b in value.items():
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -LOGIT_BIAS_MAX <= b <= LOGIT_BIAS_MAX:
                raise ValueError(f"logit_bias values must be numbers in [-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}], "
                                 f"got {b!r} for token {t}")
    elif s.name == "grammar":
        if not isinstance(value, str) or "\0" in value:
            raise TypeError(f"grammar must be GBNF text (a str without NUL; '' = none), got {value!r}")
    elif value is None and s.none:
        return
    elif s.choices:
        if value not in s.choices:
            raise ValueError(f"{s.name} must be one of {', '.join(s.choices)}, got {value!r}")
    elif s.type is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{s.name} must be True or False, got {value!r}")
    elif s.type is int:
        if not _is_int(value) or value < s.low or (s.high is not None and value > s.high) or \
                (s.int32 and value > INT32_MAX):
            raise ValueError(f"{s.name} must be {s.rule}, got {value!r}")
    else:
        _check_number(s.name, value, s.low, s.high, s.low_open, s.high_open)


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


def config_with(config: Optional[DecodeConfig], json_schema: Optional[JsonSchema] = None, **fields: Any) -> DecodeConfig:
    """``config`` (default: plain greedy) with ``fields`` replacing its fields and, given a
    ``json_schema``, decoding with the grammar of the JSON texts it describes (ValueError when the
    config has a grammar too)."""
    if config is not None and not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
    out = (config or DecodeConfig()).replace(**fields) if fields or config is None else config
    if json_schema is None:
        return out
    if out.grammar:
        raise ValueError("give a grammar or a json_schema, not both")
    return out.replace(grammar=json_schema_grammar(json_schema))
