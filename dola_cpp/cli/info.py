"""``dola-cpp info``: what a GGUF model is, and what DoLa's layer sets mean for it."""

from __future__ import annotations

import json
from typing import Any

import typer

from .. import Model, _core
from .. import sweep as sw
from ..layers import default_info_layer
from ._cli_utils import JsonOpt, ModelRequiredArg, examples, load_model
from ._render import layer_list

INFO_EXAMPLES = examples(
    "dola-cpp info smollm2",
    "dola-cpp info model.gguf --json",
)

TEMPLATE_PREVIEW_LINES = 3
TEMPLATE_PREVIEW_WIDTH = 100


def info(model: ModelRequiredArg, as_json: JsonOpt = False) -> None:
    """Show what a model is and what DoLa's layer sets mean for it.

    Its architecture, layers, vocabulary, quantization, training context length, chat template,
    tied embeddings, the layers DoLa's 'high' and 'low' sets contrast, and Activation Decoding's
    default info layer; and the last `dola-cpp eval sweep` recommendation for this file (by its
    SHA-256), if one is cached."""
    m = load_model(model, ctx=256, gpu_layers=0)
    facts = model_facts(m)
    facts["sweeps"] = sw.cached(m.path)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    rows = [
        ("file", f"{facts['path']} ({facts['size_bytes'] / 1e6:.1f} MB)"),
        ("name", facts["name"] or "(not set)"),
        ("architecture", facts["architecture"]),
        ("layers", f"{facts['n_layers']} blocks (DoLa layer {facts['n_layers']} = the final logits)"),
        ("embedding size", str(facts["n_embd"])),
        ("vocabulary", f"{facts['n_vocab']} tokens"),
        ("quantization", facts["quantization"]),
        ("context length", f"{facts['n_ctx_train']} tokens (training)"),
        ("tied embeddings", "yes" if facts["tied_embeddings"] else "no"),
    ]
    for name in ("high", "low"):
        plan = facts["layers"][name]
        rows.append((f"--layers {name}", f"{layer_list(tuple(plan['candidates']))} vs {plan['mature']}"))
    rows.append(("--info-layer", f"{facts['info_layer']} (Activation Decoding's default: round(0.8 x {facts['n_layers']}))"))
    rows.append(("CPU weight layouts", ", ".join(["plain"] + facts["cpu_extra_buffer_types"])
                 + f" (AMX: {facts['amx']})"))
    rows.append(("layer capture", facts["capture_mode"] + (" (graph outputs read after each decode)" if facts["capture_mode"] == "outputs"
                                                           else " (llama.cpp's eval callback: a split per captured layer)")))
    rows.append(("chat template", _template_summary(facts)))
    sweeps = [(f"last sweep ({task})", f"{entry.get('verdict', '')} [{entry.get('n_items')} items of "
                                       f"{entry.get('data')}, {entry.get('created')}; {entry.get('out')}]")
              for task, entry in sorted(facts["sweeps"].items())]
    width = max(len(k) for k, _ in rows + sweeps)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
    if facts["chat_template"]:
        for line in _template_preview(facts["chat_template"]):
            typer.echo(f"{'':<{width}}  │ {line}")
    for key, value in sweeps:
        typer.echo(f"{key:<{width}}  {value}")


def model_facts(m: Model) -> dict[str, Any]:
    metadata = m.metadata()
    return {
        "path": str(m.path),
        "size_bytes": m.path.stat().st_size,
        "name": metadata.get("general.name", ""),
        "architecture": m.architecture,
        "description": m.description,
        "n_layers": m.n_layers,
        "n_embd": m.n_embd,
        "n_vocab": m.n_vocab,
        "quantization": quantization(metadata, m.description),
        "n_ctx_train": m.n_ctx_train,
        "tied_embeddings": m.tied_embeddings,
        "chat_template": m.chat_template,
        "chat_template_recognised": m.chat_template_supported,
        "cpu_extra_buffer_types": _core.cpu_extra_buffer_types(),
        "amx": _core.amx_build_note(),
        "capture_mode": _core.capture_mode(),
        "layers": {
            name: {"candidates": list(plan.candidates), "mature": plan.mature}
            for name, plan in ((n, m.resolve_layers(n)) for n in ("high", "low"))
        },
        "info_layer": default_info_layer(m.n_layers),
    }


def quantization(metadata: dict[str, str], description: str) -> str:
    """The file type from ``general.file_type``, else the last word of llama.cpp's description
    (e.g. ``llama 256M Q4_1``)."""
    file_type = metadata.get("general.file_type")
    if file_type is not None:
        try:
            from gguf import LlamaFileType

            name = LlamaFileType(int(file_type)).name
            for prefix in ("MOSTLY_", "ALL_"):
                if name.startswith(prefix):
                    name = name[len(prefix):]
            return name
        except (ImportError, ValueError):
            pass
    return description.rsplit(" ", 1)[-1] if description else "unknown"


def _template_summary(facts: dict[str, Any]) -> str:
    if not facts["chat_template"]:
        return "none (the chat falls back to a plain User:/Assistant: transcript)"
    if facts["chat_template_recognised"]:
        return "yes (a format llama.cpp knows)"
    return "yes, but not a format llama.cpp knows (the chat uses a plain transcript)"


def _template_preview(template: str) -> list[str]:
    lines = [line.rstrip() for line in template.strip().splitlines()]
    out = []
    for line in lines[:TEMPLATE_PREVIEW_LINES]:
        out.append(line if len(line) <= TEMPLATE_PREVIEW_WIDTH else line[: TEMPLATE_PREVIEW_WIDTH - 1] + "…")
    if len(lines) > TEMPLATE_PREVIEW_LINES:
        out.append(f"… ({len(lines) - TEMPLATE_PREVIEW_LINES} more lines)")
    return out
