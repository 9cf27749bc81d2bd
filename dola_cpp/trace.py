"""The picture of the layers: the DoLa paper's figure 2 for one generation. Generated tokens run
along the x axis, the candidate premature layers up the y axis; each cell is the JSD between the
mature layer and that candidate at that token, the chosen (premature) layer is marked, and each
token's risk stands above its column. As a PNG/SVG/PDF (matplotlib) or a self-contained HTML
page.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .results import GenerationResult
from .risk import RISK_BANDS

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")


def check_traceable(result: GenerationResult) -> None:
    if len(result.layers) < 2:
        raise ValueError("a trace needs dynamic DoLa (two or more candidate layers): only then is a JSD computed "
                         "per layer")
    if not result.steps:
        raise ValueError("the generation produced no tokens to trace")


def jsd_matrix(result: GenerationResult) -> np.ndarray:
    """[candidate layers, tokens]: the JSD of each candidate at each generated token."""
    return np.stack([np.asarray(s.jsd, dtype=np.float64) for s in result.steps], axis=1)


def write(path: PathLike, result: GenerationResult, pieces: Sequence[str], title: str) -> None:
    """The trace of ``result`` (``pieces``: each token's text) as an image or HTML, by suffix."""
    check_traceable(result)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".html":
        path.write_text(to_html(result, pieces, title), encoding="utf-8")
    elif suffix in IMAGE_SUFFIXES:
        to_image(path, result, pieces, title)
    else:
        raise ValueError(f"the trace is written as {', '.join(IMAGE_SUFFIXES)} or .html, not {path.suffix or path.name!r}")


def _risk_colour(risk: float) -> str:
    """The risk bar's colour: green, amber or red by RISK_BANDS (the chat's bands)."""
    return "#2e9d4f" if risk < RISK_BANDS[0] else "#d9a400" if risk < RISK_BANDS[1] else "#d0312d"


def _label(piece: str, limit: int = 14) -> str:
    text = piece.replace("\n", "⏎").replace("\t", "⇥")
    text = text if text.strip() else repr(text)[1:-1] or "∅"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_image(path: Path, result: GenerationResult, pieces: Sequence[str], title: str) -> None:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("an image trace needs matplotlib (pip install 'dola-cpp[plot]'); "
                                  "or write .html") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jsd = jsd_matrix(result)
    layers = list(result.layers)
    n_tok, n_lay = jsd.shape[1], jsd.shape[0]
    risk = np.array([s.risk for s in result.steps])
    width = min(40.0, max(7.0, 0.26 * n_tok + 2.5))
    height = min(24.0, 2.6 + 0.32 * n_lay + 1.3)
    fig, (ax_r, ax) = plt.subplots(2, 1, figsize=(width, height), sharex=True,
                                   gridspec_kw={"height_ratios": [1.0, max(2.0, 0.32 * n_lay)], "hspace": 0.05})
    colours = [_risk_colour(r) for r in risk]
    ax_r.bar(np.arange(n_tok), risk, color=colours, width=0.8)
    ax_r.set_ylim(0, 1)
    ax_r.set_ylabel("risk", fontsize=8)
    ax_r.tick_params(labelsize=7)
    ax_r.set_title(title, fontsize=9, loc="left")
    im = ax.imshow(jsd, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                   extent=(-0.5, n_tok - 0.5, -0.5, n_lay - 0.5))
    chosen = [layers.index(s.premature_layer) if s.premature_layer in layers else np.nan for s in result.steps]
    ax.scatter(np.arange(n_tok), chosen, marker="s", s=34, facecolors="none", edgecolors="white", linewidths=1.3,
               label="chosen premature layer")
    ax.set_yticks(range(n_lay), [str(layer) for layer in layers], fontsize=7)
    ax.set_ylabel(f"candidate layer (mature {result.mature_layer})", fontsize=8)
    ax.set_xticks(range(n_tok), [_label(p) for p in pieces], rotation=90, fontsize=7)
    ax.set_xlim(-0.5, n_tok - 0.5)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    bar = fig.colorbar(im, ax=[ax_r, ax], fraction=0.025, pad=0.01)
    bar.set_label("JSD(mature ‖ layer), nats", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _viridis(x: float) -> str:
    """A few stops of viridis, interpolated (no matplotlib needed for HTML)."""
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    x = min(1.0, max(0.0, x)) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    t = x - i
    r, g, b = (round(a + (c - a) * t) for a, c in zip(stops[i], stops[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def to_html(result: GenerationResult, pieces: Sequence[str], title: str) -> str:
    jsd = jsd_matrix(result)
    layers = list(result.layers)
    top = float(np.nanmax(jsd)) if np.isfinite(jsd).any() else 1.0
    top = top if top > 0 else 1.0
    esc = html.escape
    rows = []
    risk_cells = "".join(
        f'<td class="risk" title="risk {s.risk:.2f}"><div style="height:{max(1, round(40 * s.risk))}px;'
        f'background:{_risk_colour(s.risk)}">'
        f"</div></td>" for s in result.steps)
    rows.append(f'<tr><th class="lab">risk</th>{risk_cells}</tr>')
    for li in reversed(range(len(layers))):
        cells = []
        for t, s in enumerate(result.steps):
            v = jsd[li, t]
            colour = _viridis(v / top) if math.isfinite(v) else "#ccc"
            mark = "■" if s.premature_layer == layers[li] else ""
            cells.append(f'<td style="background:{colour}" title="layer {layers[li]}, token {t}: JSD {v:.4f}">'
                         f"{mark}</td>")
        rows.append(f'<tr><th class="lab">{layers[li]}</th>{"".join(cells)}</tr>')
    labels = "".join(f'<th class="tok"><div>{esc(_label(p))}</div></th>' for p in pieces)
    rows.append(f'<tr><th class="lab"></th>{labels}</tr>')
    return f"""<!doctype html>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td {{ width: 16px; height: 16px; padding: 0; text-align: center; color: #fff; font-size: 10px; }}
td.risk {{ vertical-align: bottom; height: 42px; }}
th.lab {{ font-weight: normal; padding-right: 6px; text-align: right; }}
th.tok {{ height: 90px; vertical-align: bottom; font-weight: normal; }}
th.tok div {{ writing-mode: vertical-rl; transform: rotate(180deg); white-space: pre; font-family: monospace; }}
</style>
<h3>{esc(title)}</h3>
<p>Rows: candidate premature layers (mature layer {result.mature_layer}); columns: generated tokens. Colour: JSD(mature ‖
layer), 0 to {top:.3f} nats (dark to yellow); ■ the chosen premature layer; bars above: each token's risk
(green &lt; {RISK_BANDS[0]}, amber &lt; {RISK_BANDS[1]}, red above).</p>
<table>{"".join(rows)}</table>
"""
