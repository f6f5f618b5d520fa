"""The package layout is the architecture: a walk over every ``import`` of the library (ast, no
code runs) fails on an import circle between modules, on a layer importing one above it, and on a
module over the size the house keeps to.

Layers, lowest first (a package may import only what its row lists, and the stdlib/third party):

    kvstore.core, kvstore.v1                      nothing of ours
    tiers                                          core
    kvstore.wire                                   core, v1
    kvstore.engine                                 core, tiers
    client                                         core, wire, v1
    kvstore.service                                core, tiers, engine, wire, v1
    kvstore.worker                                 core, engine, wire, v1, client
    kvstore.roles                                  core, worker, client
    kvstore.config, kvstore.cli, kvstore.demo      anything below
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("kvstore", "tiers", "client")
MAX_LINES = 700

_BELOW: dict[str, set[str]] = {
    "kvstore": {"kvstore.core"},  # the package itself re-exports the core vocabulary
    "kvstore.core": set(),
    "kvstore.v1": set(),
    "tiers": {"kvstore.core"},
    "kvstore.wire": {"kvstore.core", "kvstore.v1"},
    "kvstore.engine": {"kvstore.core", "tiers"},
    "client": {"kvstore", "kvstore.core", "kvstore.wire", "kvstore.v1"},
    "kvstore.service": {"kvstore.core", "tiers", "kvstore.engine", "kvstore.wire", "kvstore.v1"},
    "kvstore.worker": {"kvstore.core", "kvstore.engine", "kvstore.wire", "kvstore.v1", "client"},
    "kvstore.roles": {"kvstore.core", "kvstore.worker", "client"},
}
_TOP = ("kvstore.config", "kvstore.cli", "kvstore.demo")


def _modules() -> dict[str, Path]:
    found = {}
    for top in LIBRARY:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    """The row of the table above that ``module`` belongs to (the longest matching prefix)."""
    best = ""
    for name in (*_BELOW, *_TOP):
        if (module == name or module.startswith(name + ".")) and len(name) > len(best):
            best = name
    assert best, f"{module} belongs to no layer: add it to the table in {__name__}"
    return best


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every module of ours that ``module`` imports, at any depth of its code, with the line."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name, node.lineno


GRAPH = {module: sorted(set(_imports(module, path))) for module, path in MODULES.items()}


def test_every_module_belongs_to_a_layer() -> None:
    for module in MODULES:
        _layer(module)


def test_no_layer_imports_one_above_it() -> None:
    wrong = []
    for module, imports in GRAPH.items():
        layer = _layer(module)
        if layer in _TOP:
            continue
        for target, line in imports:
            target_layer = _layer(target)
            if target_layer != layer and target_layer not in _BELOW[layer]:
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_circle() -> None:
    edges = {module: {target for target, _ in imports} for module, imports in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("kvstore.v1")))
def test_no_module_over_the_size_limit(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    where = MODULES[module].relative_to(ROOT)
    assert lines <= MAX_LINES, f"{where} has {lines} lines (at most {MAX_LINES})"


def test_the_walk_sees_a_known_import() -> None:
    # The test can fail: the servicer's import of the engine is seen, with its line.
    assert any(target.startswith("kvstore.engine") for target, _ in GRAPH["kvstore.service.server"])
