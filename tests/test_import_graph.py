"""The import graph of ``gateway/`` and ``middleware/`` has no cycles, and ``middleware/`` stands alone.

Read from the source with ``ast``, so every import counts: at module level, inside functions, and
under ``if TYPE_CHECKING:`` (a cycle that only the type checker sees still ties the modules
together: neither can be read, moved or tested without the other). ``from package import name``
points at ``package.name`` when that is a module, else at the package. The implicit import of a
module's parent packages is not an edge: every submodule would otherwise depend on its
package's ``__init__``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "middleware")


def modules(root: Path) -> dict[str, Path]:
    """Every module of the packages, by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _known(name: str, known: Mapping[str, Path]) -> str | None:
    """``name`` or its nearest enclosing module of ours (None: a foreign import)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imported(module: str, path: Path, known: Mapping[str, Path]) -> Iterator[str]:
    """The modules of ours that ``module`` imports, anywhere in its source."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _known(alias.name, known)) is not None:
                    yield target
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in known else _known(base, known)
                if target is not None:
                    yield target


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {module: set(imported(module, path, known)) - {module} for module, path in known.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _describe(graph: Mapping[str, set[str]], component: list[str]) -> str:
    members = set(component)
    return "\n".join(f"  {m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (all imports count, TYPE_CHECKING ones too):\n" + "\n\n".join(
        _describe(graph, component) for component in found
    )


def test_middleware_imports_nothing_from_gateway() -> None:
    graph = import_graph()
    leaks = {m: sorted(t for t in targets if t.split(".")[0] == "gateway") for m, targets in graph.items()}
    assert {m: t for m, t in leaks.items() if m.startswith("middleware") and t} == {}


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"a": "import gateway.b\n", "b": "from gateway import a\n"}, [["gateway.a", "gateway.b"]]),
        ({"a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gateway.b import X\n",
          "b": "def f():\n    from . import a\n"}, [["gateway.a", "gateway.b"]]),
        ({"a": "import gateway.b\n", "b": "import gateway.c\n", "c": "import httpx\n"}, []),
    ],
    ids=["plain", "type-checking-and-function-level", "acyclic"],
)
def test_the_graph_sees_every_kind_of_import(tmp_path: Path, sources: dict[str, str], expected: list[list[str]]) -> None:
    (tmp_path / "gateway").mkdir()
    (tmp_path / "middleware").mkdir()
    (tmp_path / "gateway" / "__init__.py").write_text("")
    (tmp_path / "middleware" / "__init__.py").write_text("")
    for name, source in sources.items():
        (tmp_path / "gateway" / f"{name}.py").write_text(source)
    assert cycles(import_graph(tmp_path)) == expected
