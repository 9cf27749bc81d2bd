"""Resolution of DoLa layer specs, as transformers' ``generate(dola_layers=...)`` and the DoLa
repository's ``--early-exit-layers`` define them.

Layer ``j`` means what ``hidden_states[j]`` means in transformers: 0 = embedding output,
1..N-1 = output of block j-1, N = the final layer (the model's own logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

LayerSpec = Union[str, Sequence[int], None]

_PLAIN = {"none", "off", "plain", "vanilla"}
_NAMED = {"low", "high"}


@dataclass(frozen=True)
class LayerPlan:
    """Which layers a decode contrasts: ``candidates`` (premature) against ``mature``."""

    candidates: tuple[int, ...]
    mature: int

    @property
    def is_plain(self) -> bool:
        return not self.candidates

    @property
    def mode(self) -> str:
        if not self.candidates:
            return "plain"
        return "static" if len(self.candidates) == 1 else "dynamic"


def start_layer(n_layer: int, tied_embeddings: bool) -> int:
    """First candidate layer as transformers picks it: the embedding output is an identity map
    through tied embeddings, so tied models skip it."""
    if not tied_embeddings:
        return 0
    if n_layer > 2:
        return 2
    return 1 if n_layer == 2 else 0


def named_layers(name: str, n_layer: int, tied_embeddings: bool) -> list[int]:
    """transformers' ``dola_layers="low"|"high"`` for an N-block model."""
    N = n_layer
    start = start_layer(N, tied_embeddings)
    if name == "low":
        if start == N // 2:
            return [start]
        return list(range(start, N // 2, 2)) if N <= 40 else list(range(start, 20, 2))
    if name == "high":
        return list(range(N // 2, N, 2)) if N <= 40 else list(range(N - 20, N, 2))
    raise ValueError(f"unknown layer set {name!r}: use 'low', 'high', a list of layers or a string like '16,18,32'")


def default_info_layer(n_layer: int) -> int:
    """Activation Decoding's info layer when none is given: round(0.8 * N), as the reference's
    26 of 32 (Llama-2-7B), kept below the final layer."""
    return max(0, min(n_layer - 1, int(math.floor(0.8 * n_layer + 0.5))))


def _check_range(values: Sequence[int], n_layer: int, what: str) -> None:
    for v in values:
        if not 0 <= v <= n_layer:
            raise ValueError(f"{what} {v} is out of range: valid layers are 0..{n_layer} for this {n_layer}-layer model")


def parse_layer_string(spec: str) -> Union[str, list[int]]:
    """The grammar of a layer string, without a model: ``"none"`` (and its synonyms), ``"low"``,
    ``"high"``, or comma-separated layer numbers. Raises ValueError saying what is wrong."""
    s = spec.strip().lower()
    if s in _PLAIN:
        return "none"
    if s in _NAMED:
        return s
    hint = "use high, low, none (plain decoding), or comma-separated layer numbers such as 16,18,32"
    if not s:
        raise ValueError(f"empty layer spec: {hint}")
    parts = [x.strip() for x in s.split(",")]
    if any(x == "" for x in parts):
        raise ValueError(f"{spec!r} has an empty entry between commas: {hint}")
    try:
        return [int(x) for x in parts]
    except ValueError:
        raise ValueError(f"{spec!r} is not a layer spec: {hint}") from None


def resolve_layers(spec: LayerSpec, n_layer: int, tied_embeddings: bool) -> LayerPlan:
    """Turn a user's layer spec into a :class:`LayerPlan`.

    - ``None`` / ``"none"``: plain decoding.
    - ``"low"`` / ``"high"``: transformers' candidate sets, mature = N.
    - a list of ints: candidates, kept in order, entries >= N dropped (as transformers does).
    - a string of comma-separated ints, the DoLa repo's ``--early-exit-layers``: one value =
      plain decoding from that layer; two = static DoLa (premature, mature); more = dynamic
      DoLa whose last value is the mature layer.
    """
    N = n_layer
    if spec is None:
        return LayerPlan((), N)
    if isinstance(spec, str):
        parsed = parse_layer_string(spec)
        if parsed == "none":
            return LayerPlan((), N)
        if isinstance(parsed, str):
            return LayerPlan(tuple(named_layers(parsed, N, tied_embeddings)), N)
        values = parsed
        _check_range(values, N, "layer")
        *cands, mature = values
        if mature < 1:
            raise ValueError(f"the mature layer must be in 1..{N}, got {mature}")
        if mature in cands:
            raise ValueError(f"layer {mature} is both a premature candidate and the mature layer")
        above = [c for c in cands if c > mature]
        if above:
            raise ValueError(f"premature layer {above[0]} is above the mature layer {mature} (the last value): "
                             f"DoLa contrasts the mature layer with earlier ones, e.g. {mature // 2},{mature}")
        return LayerPlan(tuple(dict.fromkeys(cands)), mature)
    if isinstance(spec, (bytes, bytearray)):
        raise TypeError("layers must be a string or a sequence of ints")
    try:
        values = [int(v) for v in spec]
    except (TypeError, ValueError):
        raise TypeError(f"layers must be 'low', 'high', a layer string or a sequence of ints, got {spec!r}") from None
    if any(v < 0 for v in values):
        raise ValueError(f"negative layer in {values}: valid premature layers are 0..{N - 1}")
    kept = [v for v in values if v < N]  # transformers drops layers >= N
    if not kept:
        raise ValueError(f"no premature layer left in {values}: valid premature layers are 0..{N - 1}")
    return LayerPlan(tuple(dict.fromkeys(kept)), N)
