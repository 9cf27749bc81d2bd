"""dola_cpp/_core.pyi is true to the compiled module: mypy's stubtest finds no difference, and the
parameters pybind11 reports for each binding (which stubtest cannot read from a compiled
function) are the stub's, names and defaults. A binding added, removed or renamed in
csrc/bindings.cpp without the stub fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dola_cpp
from dola_cpp import _core

STUB = Path(dola_cpp.__file__).with_name("_core.pyi")
KERNELS_PROTOCOL = "_Kernels"  # the stub's type of the kernels submodule


def test_stubtest_finds_no_difference(tmp_path):
    # from an empty folder: `-m` puts the working directory first on sys.path, and a checkout's
    # root would shadow the installed package
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "--concise", "dola_cpp._core"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def _split_top_level(text: str) -> list[str]:
    """text split at the commas outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts]


def _runtime_params(obj) -> list[tuple[str, bool]] | None:
    """(name, has a default) of each parameter but self, from pybind11's signature line; None for
    a callable without one (pybind11's constructor-less __init__)."""
    name = obj.__name__
    line = (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""
    if not line.startswith(name + "("):
        return None
    inner, depth = "", 0
    for ch in line[len(name):]:
        depth += ch == "("
        depth -= ch == ")"
        inner += ch
        if depth == 0:
            break
    params = []
    for part in _split_top_level(inner[1:-1]):
        pname = part.split(":")[0].split("=")[0].strip()
        if pname != "self":
            params.append((pname, " = " in part))
    return params


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, bool]]:
    args = fn.args.posonlyargs + fn.args.args
    n_plain = len(args) - len(fn.args.defaults)
    out = [(a.arg, i >= n_plain) for i, a in enumerate(args) if a.arg != "self"]
    if fn.args.vararg:
        out.append(("*" + fn.args.vararg.arg, False))
    if fn.args.kwarg:
        out.append(("**" + fn.args.kwarg.arg, False))
    return out


def _is_property(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)


def _stub_callables() -> list[tuple[str, ast.FunctionDef, object]]:
    """(dotted name, the stub's def, the runtime object) of every function and method in the stub."""
    tree = ast.parse(STUB.read_text())
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out.append((node.name, node, getattr(_core, node.name, None)))
        elif isinstance(node, ast.ClassDef):
            owner = _core.kernels if node.name == KERNELS_PROTOCOL else getattr(_core, node.name, None)
            if owner is None:  # a typing-only class (the metaclass)
                continue
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not _is_property(item):
                    out.append((f"{node.name}.{item.name}", item, getattr(owner, item.name, None)))
    return out


CALLABLES = _stub_callables()


@pytest.mark.parametrize("name, stub, runtime", CALLABLES, ids=[c[0] for c in CALLABLES])
def test_parameters_match_the_binding(name, stub, runtime):
    assert runtime is not None, f"{name} is in the stub but not in the module"
    params = _runtime_params(runtime)
    if params is None:
        assert _stub_params(stub) == [("*args", False), ("**kwargs", False)], name
        return
    assert _stub_params(stub) == params, f"{name}: the stub has {_stub_params(stub)}, the binding {params}"


def test_the_kernels_protocol_lists_the_submodule():
    tree = ast.parse(STUB.read_text())
    protocol = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == KERNELS_PROTOCOL)
    stubbed = {n.name for n in protocol.body if isinstance(n, ast.FunctionDef)}
    public = {n for n in dir(_core.kernels) if not n.startswith("_")}
    assert stubbed == public
