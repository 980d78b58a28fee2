"""The package is imported top to bottom only (README, "Architecture").

``cli -> sim, deploy -> server, client -> load -> strategies -> adapters, privacy -> tasks -> data
-> config, io, wire``: a module may import its own subpackage or any subpackage on a lower floor;
never one above, never a sibling on the same floor (``server`` and ``client`` do not import each
other, nor do ``sim`` and ``deploy`` or ``adapters`` and ``privacy``). Function-local and
``TYPE_CHECKING`` imports obey the same rule (laziness is allowed, dodging a circle is not), and
the import graph of all modules, counting every import, has no circle.

The scan reads the source (AST), so it also sees imports that a test run never executes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "fedpeft"

#: floor of each top-level subpackage (higher imports lower). Siblings share a floor.
FLOORS: dict[str, int] = {
    "config": 0, "io": 0, "wire": 0,
    "data": 1,
    "tasks": 2,
    "adapters": 3, "privacy": 3,
    "strategies": 4,
    "load": 5,
    "server": 6, "client": 6,
    "sim": 7, "deploy": 7,
    "cli": 8,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module a dotted import name refers to (``from a.b import c`` may name a module c)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, int, str]]:
    """(target module, line, kind) for every project import; kind is top, local or type-checking."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int, str]] = []

    def names(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if is_pkg else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        # ``from a import b``: the module a.b when b is a module, else the module a
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, "type-checking")
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in {t for t in map(_resolve, names(child)) if t and t != module}:
                    found.append((target, child.lineno, kind))
            inner = "local" if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) and kind == "top" else kind
            visit(child, inner)

    visit(tree, "top")
    return found


def _floor_name(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


EDGES = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_subpackage_has_a_floor() -> None:
    unknown = sorted({_floor_name(m) for m in MODULES} - set(FLOORS) - {""})
    assert not unknown, f"subpackages without a floor in this test (add them to FLOORS and the README): {unknown}"


def test_the_root_package_imports_nothing() -> None:
    assert EDGES[PACKAGE] == [], "fedpeft/__init__.py must stay empty of project imports (it is imported first)"


@pytest.mark.parametrize("kind", ["top", "local", "type-checking"])
def test_imports_only_go_down(kind: str) -> None:
    bad = []
    for module, edges in EDGES.items():
        here = _floor_name(module)
        for target, line, how in edges:
            there = _floor_name(target)
            if how != kind or not here or here == there:
                continue
            if not there or FLOORS[there] >= FLOORS[here]:
                bad.append(f"{MODULES[module].relative_to(SRC)}:{line} {module} -> {target}")
    assert not bad, f"{kind} imports against the order ({len(bad)}):\n" + "\n".join(bad)


def test_no_import_circle() -> None:
    graph = {m: sorted({t for t, _, _ in edges}) for m, edges in EDGES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    # A package __init__ that re-exports its own modules is not a circle by itself: modules
    # inside a package import siblings, never their package's __init__ (checked here too).
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_scan_sees_what_it_must() -> None:
    """Positive control: a known downward import is found, and the floors cover the layers."""
    server_loop = {t for t, _, _ in EDGES.get("fedpeft.server.loop", [])}
    assert any(t.startswith("fedpeft.strategies") for t in server_loop)
    assert len(MODULES) > 50
