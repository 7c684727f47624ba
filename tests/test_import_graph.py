"""The import graph among kvrouter's modules, read with ``ast`` (nothing is imported).

Every ``import``/``from … import`` statement counts, wherever it is (module level, inside a
function, under ``if TYPE_CHECKING:``), relative or absolute; ``from kvrouter.server import
admin`` is an edge to the module ``kvrouter.server.admin`` (to the package when the name is
not a module). Importing a submodule is not counted as importing its parent packages.

Asserted: no cycle among the modules of ``kvrouter/server/``; the runtime (all but the lab:
``kvrouter/sim``, ``kvrouter/bench``, ``kvrouter/demo``) never imports the lab;
``kvrouter/http/`` never imports ``kvrouter.server``.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvrouter"
LAB = ("kvrouter.sim", "kvrouter.bench", "kvrouter.demo")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
            if "__pycache__" not in p.parts}


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import …`` written in ``module``."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported kvrouter module, line)`` of every import statement in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int]] = []

    def known(name: str) -> str | None:
        """``name`` or its nearest enclosing module known to the package."""
        while name:
            if name in modules:
                return name
            name = name.rpartition(".")[0]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_under(alias.name, "kvrouter"):
                    target = known(alias.name)
                    if target:
                        out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = (resolve_relative(module, is_package, node.level, node.module)
                    if node.level else (node.module or ""))
            if not is_under(base, "kvrouter"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else known(base)
                if target:
                    out.append((target, node.lineno))
    return out


def build_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    modules = discover()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    lines: dict[tuple[str, str], int] = {}
    for mod, path in modules.items():
        for target, line in imports_of(mod, path, modules):
            if target != mod:
                graph[mod].add(target)
                lines.setdefault((mod, target), line)
    return graph, lines


GRAPH, LINES = build_graph()
PATHS = {m: p.relative_to(ROOT) for m, p in discover().items()}


def where(a: str, b: str) -> str:
    return f"{a} -> {b}  ({PATHS[a]}:{LINES[(a, b)]})"


def find_cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One cycle (``[a, b, …, a]``) in the subgraph induced by ``nodes``, or ``None``."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(nodes, WHITE)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        stack.append(n)
        for m in sorted(graph[n] & nodes):
            if color[m] == GREY:
                return [*stack[stack.index(m):], m]
            if color[m] == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(nodes):
        if color[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def describe(cycle: list[str]) -> str:
    return "\n  ".join(where(a, b) for a, b in itertools.pairwise(cycle))


# -- the parser itself ---------------------------------------------------------------------------
def test_graph_covers_the_package_and_resolves_import_forms():
    assert "kvrouter.server.app" in GRAPH and "kvrouter.http.server" in GRAPH
    # ``from kvrouter.server import admin, inference`` names modules
    assert {"kvrouter.server.admin", "kvrouter.server.inference"} <= GRAPH["kvrouter.server.app"]
    # ``from kvrouter.http.upstream import X`` is the module itself
    assert "kvrouter.http.upstream" in GRAPH["kvrouter.server.leg"]


def test_relative_and_type_checking_imports_are_counted(tmp_path):
    pkg = tmp_path / "kvrouter"
    (pkg / "a").mkdir(parents=True)
    for f in ("__init__.py", "x.py", "a/__init__.py", "a/b.py", "a/c.py"):
        (pkg / f).write_text("")
    (pkg / "a" / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import c\n"
        "from ..x import thing\n"
        "if TYPE_CHECKING:\n"
        "    from kvrouter.a import c as again\n"
        "def f():\n"
        "    import kvrouter.x\n")
    (pkg / "a" / "__init__.py").write_text("from .b import name\n")
    modules = {}
    for p in pkg.rglob("*.py"):
        parts = list(p.relative_to(tmp_path).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = p
    got_b = {t for t, _ in imports_of("kvrouter.a.b", modules["kvrouter.a.b"], modules)}
    assert got_b == {"kvrouter.a.c", "kvrouter.x"}
    got_a = {t for t, _ in imports_of("kvrouter.a", modules["kvrouter.a"], modules)}
    assert got_a == {"kvrouter.a.b"}
    lines = [line for t, line in imports_of("kvrouter.a.b", modules["kvrouter.a.b"], modules)
             if t == "kvrouter.a.c"]
    assert 5 in lines          # the TYPE_CHECKING one


def test_find_cycle_reports_the_loop():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(g, set(g)) == ["a", "b", "c", "a"]
    assert find_cycle(g, {"a", "b", "d"}) is None


# -- the rules -----------------------------------------------------------------------------------
def test_no_cycle_among_server_modules():
    server = {m for m in GRAPH if is_under(m, "kvrouter.server")}
    assert len(server) > 5
    cycle = find_cycle(GRAPH, server)
    if cycle:
        print("import cycle in kvrouter/server:\n  " + describe(cycle))
    assert cycle is None, "import cycle in kvrouter/server:\n  " + describe(cycle)


def test_runtime_never_imports_the_lab():
    bad = sorted(where(m, t)
                 for m, targets in GRAPH.items()
                 if not any(is_under(m, lab) for lab in LAB)
                 for t in targets if any(is_under(t, lab) for lab in LAB))
    if bad:
        print("\n".join(bad))
    assert not bad, "the runtime imports the lab:\n" + "\n".join(bad)


def test_http_never_imports_server():
    bad = sorted(where(m, t)
                 for m, targets in GRAPH.items() if is_under(m, "kvrouter.http")
                 for t in targets if is_under(t, "kvrouter.server"))
    if bad:
        print("\n".join(bad))
    assert not bad, "kvrouter/http imports kvrouter.server:\n" + "\n".join(bad)


@pytest.mark.parametrize("lab", LAB)
def test_lab_packages_exist(lab):
    """Guards the rule above against a rename that would make it vacuous."""
    assert any(is_under(m, lab) for m in GRAPH)
