"""Text formatting for the command line: layer plans, stats lines, histograms, columns."""

from __future__ import annotations

import textwrap
from typing import Mapping

from .. import DecodeConfig, GenerationResult, LayerPlan

_BAR = "█"
_PARTIAL = " ▏▎▍▌▋▊▉"


def describe_plan(plan: LayerPlan, n_layers: int, premature_norm: bool = False) -> str:
    """E.g. ``DoLa (normed premature layers): layers 15,17,…,29 vs 30`` or ``plain decoding``:
    DoLa always says which variant runs, the paper's raw hidden states or the final norm first."""
    if plan.is_plain:
        if plan.mature == n_layers:
            return "plain decoding"
        return f"plain decoding from layer {plan.mature} (early exit)"
    variant = "normed" if premature_norm else "raw"
    if len(plan.candidates) == 1:
        return f"DoLa (static, {variant} premature layer): layer {plan.candidates[0]} vs {plan.mature}"
    return f"DoLa ({variant} premature layers): layers {layer_list(plan.candidates)} vs {plan.mature}"


def describe_config(config: DecodeConfig, plan: LayerPlan, n_layers: int) -> str:
    """``describe_plan``, with Activation Decoding's settings in front when it is on, e.g.
    ``Activation Decoding (alpha 0.5, normed info layer 24) on DoLa (…)``."""
    base = describe_plan(plan, n_layers, config.dola.premature_norm)
    if not config.uses_activation:
        return base
    variant = "normed" if config.dola.premature_norm else "raw"
    layer = config.activation.resolve_info_layer(n_layers)
    return f"Activation Decoding (alpha {config.activation.alpha:g}, {variant} info layer {layer}) on {base}"


def layer_list(layers: tuple[int, ...]) -> str:
    return ",".join(str(layer) for layer in layers)


def top_layers(hist: Mapping[int, int], limit: int = 4) -> str:
    """The most chosen premature layers, e.g. ``29×40 27×2``."""
    ranked = sorted(((n, layer) for layer, n in hist.items() if n), key=lambda t: (-t[0], t[1]))
    text = " ".join(f"{layer}×{n}" for n, layer in ranked[:limit])
    if len(ranked) > limit:
        text += f" (+{len(ranked) - limit} more)"
    return text or "none"


def histogram(hist: Mapping[int, int], width: int = 30, indent: str = "  ") -> str:
    """One bar per candidate layer, scaled to the most chosen one."""
    if not hist:
        return f"{indent}(plain decoding: no premature layer)"
    top = max(hist.values()) or 1
    total = sum(hist.values()) or 1
    label = max(len(str(layer)) for layer in hist)
    lines = []
    for layer in sorted(hist):
        n = hist[layer]
        eighths = round(8 * width * n / top)
        bar = _BAR * (eighths // 8) + (_PARTIAL[eighths % 8] if eighths % 8 else "")
        lines.append(f"{indent}layer {layer:>{label}} │{bar:<{width}} {n:>5}  {100 * n / total:5.1f}%")
    return "\n".join(lines)


def stats_line(result: GenerationResult, interrupted: bool = False) -> str:
    """One line after an answer: speed, prompt and the premature layers chosen."""
    if interrupted and not result.tokens:
        return f"interrupted while reading the prompt ({result.prompt_tokens} tokens)"
    parts = [
        f"{len(result.tokens)} tokens",
        f"{result.tokens_per_second:.1f} tok/s",
        f"prompt {result.prompt_tokens} tokens in {result.prefill_seconds:.2f} s",
    ]
    if result.mature_layer is not None:
        parts.append(f"layers {top_layers(result.layer_histogram())}")
    if result.risk is not None:
        parts.append(f"risk {result.risk:.2f}")
    if interrupted:
        parts.append("interrupted")
    elif result.finish_reason == "length":
        parts.append("stopped at the token limit")
    elif result.finish_reason == "abstained":
        parts.append("abstained")
    elif result.finish_reason == "loop":
        parts.append(f"stopped: repeating a cycle of {result.loop} tokens (risk counts it as 1)")
    return " · ".join(parts)


def wrap(text: str, width: int) -> list[str]:
    """``text`` wrapped to ``width``, keeping its own line breaks."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        lines.extend(textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=True) or [""])
    return lines


def side_by_side(*panes: tuple[str, str], width: int, gap: str = " │ ") -> str:
    """(title, text) panes next to each other within ``width`` columns."""
    col = (width - len(gap) * (len(panes) - 1)) // len(panes)
    titles = [wrap(title, col) for title, _ in panes]
    rows = max(len(t) for t in titles)
    # start every text on the same row even when the titles wrap differently
    cols = [t + [""] * (rows - len(t)) + ["─" * col] + wrap(text, col) for t, (_, text) in zip(titles, panes)]
    n = max(len(c) for c in cols)
    cols = [c + [""] * (n - len(c)) for c in cols]
    return "\n".join(gap.join(f"{cell:<{col}}" for cell in line).rstrip() for line in zip(*cols))
