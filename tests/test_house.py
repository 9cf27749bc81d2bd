"""The package's shape: no module reaches into another's private names, and the modules import
each other without a cycle. Read from the source with ast, so nothing is imported (and no
model loaded); each check is also run on a small package made to break it, so that a check that
can no longer fail is noticed."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dola_cpp"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


class Package:
    """The modules of the package at ``root`` (a folder), by dotted name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: dict[str, Path] = {}
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            self.modules[".".join(parts)] = path

    def is_module(self, name: str) -> bool:
        """Whether ``name`` is a module of the package: a .py file, a subpackage, or a compiled
        extension (``_core``: its .so, or its .pyi where the build is elsewhere)."""
        if name in self.modules:
            return True
        *parents, last = name.split(".")
        folder = self.root.parent.joinpath(*parents)
        return (folder / last).is_dir() or any(folder.glob(last + ".*"))

    def tree(self, name: str) -> ast.Module:
        return ast.parse(self.modules[name].read_text(encoding="utf-8"), str(self.modules[name]))

    def base(self, name: str, node: ast.ImportFrom) -> str:
        """The dotted module a ``from ... import`` reads from."""
        if not node.level:
            return node.module or ""
        here = name.split(".") if self.modules[name].name == "__init__.py" else name.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        return ".".join(here + ([node.module] if node.module else []))

    def imports(self, name: str, tree: ast.Module):
        """``(node, module)`` for each import of one of the package's modules, skipping those only
        a type checker runs (under ``if TYPE_CHECKING:``)."""
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for n in ast.walk(stmt)}
        top = self.root.name
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == top or alias.name.startswith(top + "."):
                        yield node, alias.name
            elif isinstance(node, ast.ImportFrom):
                base = self.base(name, node)
                if base != top and not base.startswith(top + "."):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    yield node, sub if self.is_module(sub) else base

    def private_uses(self) -> list[str]:
        """Each place a module uses another module's private name (``from .x import _y``,
        ``x._y``) or an object's private attribute other than through ``self``/``cls``."""
        found = []
        for name in self.modules:
            tree = self.tree(name)
            where = lambda node: f"{self.modules[name].relative_to(self.root.parent)}:{node.lineno}"  # noqa: E731
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and self.base(name, node).split(".")[0] == self.root.name:
                    base = self.base(name, node)
                    for alias in node.names:
                        if _private(alias.name) and not self.is_module(f"{base}.{alias.name}"):
                            found.append(f"{where(node)}: from {base} import {alias.name}")
                elif isinstance(node, ast.Attribute) and _private(node.attr):
                    if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                        found.append(f"{where(node)}: {ast.unparse(node)}")
        return found

    def cycle(self) -> list[str]:
        """One import cycle among the modules (each name followed by the one it imports), or []."""
        graph = {name: sorted({m for _, m in self.imports(name, self.tree(name)) if m in self.modules} - {name})
                 for name in self.modules}
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        path: list[str] = []

        def visit(name: str) -> list[str]:
            state[name] = 1
            path.append(name)
            for dep in graph[name]:
                if state.get(dep) == 1:
                    return path[path.index(dep):] + [dep]
                if dep not in state and (found := visit(dep)):
                    return found
            path.pop()
            state[name] = 2
            return []

        for name in graph:
            if name not in state and (found := visit(name)):
                return found
        return []


def _make(tmp_path: Path, files: dict[str, str]) -> Package:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return Package(tmp_path / "pkg")


def test_no_module_uses_another_modules_private_names():
    found = Package(PACKAGE).private_uses()
    assert not found, "private names used across modules (give them a public name, or move them):\n" + "\n".join(found)


def test_the_modules_import_each_other_without_a_cycle():
    cycle = Package(PACKAGE).cycle()
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_checks_find_what_they_look_for(tmp_path):
    pkg = _make(tmp_path, {
        "__init__.py": "from .a import A\n",
        "_ext.pyi": "",  # a compiled module: importing it by its private name is fine
        "a.py": """
            from typing import TYPE_CHECKING
            from . import _ext, b
            from .b import _helper, public
            if TYPE_CHECKING:
                from .c import C
            class A:
                def f(self, other):
                    return self._mine, other._theirs, b._hidden, _ext.thing
            """,
        "b.py": "from .c import C\ndef _helper(): pass\ndef public(): pass\n",
        "c.py": "class C: pass\ndef later():\n    from .a import A\n",
    })
    found = pkg.private_uses()
    assert sorted(f.split(": ", 1)[1] for f in found) == ["b._hidden", "from pkg.b import _helper", "other._theirs"], found
    # a -> b -> c -> a (c's import inside a function counts: it is a cycle once it runs);
    # a's TYPE_CHECKING import of c does not
    assert pkg.cycle() == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (tmp_path / "pkg" / "c.py").write_text("class C: pass\n")
    assert pkg.cycle() == []


@pytest.mark.parametrize("source, expected", [
    ("from . import sibling\n", ["pkg.sub.sibling"]),
    ("from .. import top\n", ["pkg.top"]),
    ("from ..sub import name\n", ["pkg.sub"]),
    ("import pkg.top\n", ["pkg.top"]),
])
def test_relative_imports_resolve_to_the_module_they_read(tmp_path, source, expected):
    pkg = _make(tmp_path, {"__init__.py": "", "top.py": "", "sub/__init__.py": "", "sub/sibling.py": "",
                           "sub/m.py": source})
    assert [m for _, m in pkg.imports("pkg.sub.m", pkg.tree("pkg.sub.m"))] == expected
