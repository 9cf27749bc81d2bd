"""How the command line's help pages read: options grouped by what they control (one panel
each), arguments and values named in capitals (``MODEL``, ``N``), ranges in words.

A command made with ``cls=DolaCommand`` lists the options that name no panel first (a
command's own, e.g. serve's --host), then each panel's options, a panel being what an option
names with ``rich_help_panel=`` (one of the ``PANEL_*`` names below; a new option joins a panel
with that one argument), in ``PANELS`` order. ``--help`` ends the first list, or stands last.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from typer.core import TyperCommand

PANEL_DECODING = "Decoding"  # which layers are contrasted and how: DoLa, Activation Decoding, penalties
PANEL_SAMPLING = "Sampling"  # how the next token is drawn from the scores
PANEL_STOPPING = "Stopping"  # when an answer ends
PANEL_PROMPT = "Prompt"  # how the text becomes model input
PANEL_ENGINE = "Engine"  # llama.cpp: context, threads, devices, weight layout
PANEL_OUTPUT = "Output"  # what is printed or written
PANELS = (PANEL_DECODING, PANEL_SAMPLING, PANEL_STOPPING, PANEL_PROMPT, PANEL_ENGINE, PANEL_OUTPUT)

COLUMN_MAX = 30  # the widest option names that share a line with their help (click's default)

# Typer's and click's names for a value's type, as a help page names the value.
_VALUE_NAMES = {
    "str": "TEXT", "text": "TEXT", "list[str]": "TEXT",
    "int": "N", "int range": "N", "integer": "N", "integer range": "N",
    "float": "X", "float range": "X",
    "path": "PATH", "file": "FILE", "directory": "DIR",
}
_NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
_RANGE = re.compile(rf"^(?:(?P<lo>{_NUMBER})(?P<lo_op><=?)x(?:(?P<hi_op><=?)(?P<hi>{_NUMBER}))?"
                    rf"|x(?P<op>[<>]=?)(?P<value>{_NUMBER}))$")


def _number(text: str) -> str:
    value = float(text)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def range_in_words(text: str) -> Optional[str]:
    """click's and Typer's range notation (``x>=0``, ``0.0<=x<=1.0``, ``0<x``) in words; None when
    ``text`` is not one."""
    m = _RANGE.match(text.strip())
    if not m:
        return None
    if m["op"]:
        value = _number(m["value"])
        return {">=": f"at least {value}", ">": f"more than {value}", "<=": f"at most {value}",
                "<": f"less than {value}"}[m["op"]]
    lo = _number(m["lo"])
    low = f"at least {lo}" if m["lo_op"] == "<=" else f"more than {lo}"
    if m["hi"] is None:
        return low
    hi = _number(m["hi"])
    if m["lo_op"] == "<=" and m["hi_op"] == "<=":
        return f"{lo} to {hi}"
    return f"{low}, {'at most' if m['hi_op'] == '<=' else 'less than'} {hi}"


def value_name(type_text: str) -> str:
    """A value's name on a help page from Typer's or click's (``<int range>``, ``INTEGER RANGE``,
    ``<auto|chat|none>``, ``[auto|chat|none]``): ``N``, ``X``, ``TEXT``, ``auto|chat|none``."""
    inner = type_text.strip()
    if len(inner) > 1 and inner[0] + inner[-1] in ("<>", "[]", "{}"):
        inner = inner[1:-1]
    if "|" in inner:
        return inner
    return _VALUE_NAMES.get(inner.lower(), inner.upper())


def _help_text(help: str) -> str:
    """``help`` with the range in its trailing ``[default: …; x>=0]`` in words."""
    m = re.match(r"^(?P<text>.*?)(?P<sep>\s*)\[(?P<extra>[^\[\]]*)\]$", help, re.S)
    if not m:
        return help
    parts = [range_in_words(part) or part for part in m["extra"].split("; ")]
    return f"{m['text']}{m['sep']}[{'; '.join(parts)}]"


def _option_name(param: Any, record_name: str) -> str:
    """``-n, --max-tokens N`` from Typer's ``-n, --max-tokens <int range>`` (or click's ``INTEGER
    RANGE``); flags and an explicit ``metavar`` stay as they are."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False) or param.metavar is not None:
        return record_name
    m = re.match(r"^(-{1,2}[\w-]+(?:, -{1,2}[\w-]+)*) (.+)$", record_name)
    return f"{m[1]} {value_name(m[2])}" if m else record_name


def argument_name(param: Any) -> str:
    """An argument as usage lines and help pages name it: ``MODEL``."""
    return (param.metavar or param.name or "").upper()


def _argument_usage(param: Any) -> str:
    name = argument_name(param)
    if getattr(param, "nargs", 1) != 1:
        name += "..."
    return name if param.required else f"[{name}]"


class DolaCommand(TyperCommand):
    """A command whose help lists its options by panel (see the module's docstring)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_argument_usage(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments: list[tuple[str, str]] = []
        panels: dict[str, list[tuple[str, str]]] = {}
        help_option: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name, help = record
            if param.param_type_name == "argument":
                arguments.append((argument_name(param), _help_text(help)))
            elif param.name == "help":
                help_option.append((name, help))
            else:
                panel = getattr(param, "rich_help_panel", None) or ""
                panels.setdefault(panel, []).append((_option_name(param, name), _help_text(help)))
        sections = []
        if arguments:
            sections.append(("Arguments", arguments))
        if "" in panels:
            sections.append(("Options", panels.pop("") + help_option))
            help_option = []
        order = [p for p in PANELS if p in panels] + [p for p in panels if p not in PANELS]
        sections += [(f"{panel} options", panels[panel]) for panel in order]
        if help_option:
            sections.append(("Other options" if order else "Options", help_option))
        # one column for the names on the whole page: pad the shorter ones (longer ones than
        # COLUMN_MAX get a line of their own, as click does)
        width = min(max((len(name) for _, rows in sections for name, _ in rows), default=0), COLUMN_MAX)
        for title, rows in sections:
            with formatter.section(title):
                formatter.write_dl([(name.ljust(width), help) for name, help in rows], col_max=COLUMN_MAX)
