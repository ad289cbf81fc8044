"""The package's layers: nothing imports upward and there are no import cycles.

Layers, top to bottom (docs/architecture.md): ``cli``/``demo`` -> ``steps`` -> ``registry``,
``monitoring`` -> ``engine`` -> ``data`` -> ``config`` -> ``storage``, ``errors``,
``boundary``. A module may import from its own layer only where the graph stays acyclic, which
the cycle check enforces.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sae_pipeline"

# Lower number = lower layer. A module imports only from layers <= its own.
LAYERS = {
    "errors": 0,
    "boundary": 0,
    "storage": 0,
    "config": 1,
    "data": 2,
    "engine": 3,
    "registry": 4,
    "monitoring": 4,
    "steps": 5,
    "demo": 6,
    "cli": 7,
    "__init__": 7,
}
MAX_LINES = 450
# Modules allowed past MAX_LINES, each with its reason (kept in docs/architecture.md too).
LONG_MODULES: dict[str, str] = {}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def absolute_module(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The absolute module an ``ImportFrom`` names; relative ones (``from ..steps import x``)
    are resolved against the importing module's package, as Python does."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(path: Path, name: str) -> set[str]:
    """Every ``sae_pipeline`` module this file imports, at any depth (function-level too),
    relative imports included."""
    known = modules()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sae_pipeline"))
        elif isinstance(node, ast.ImportFrom):
            module = absolute_module(node, name, path)
            if not module.startswith("sae_pipeline"):
                continue
            for a in node.names:  # `from sae_pipeline.data import batches` names a module
                sub = f"{module}.{a.name}"
                found.add(sub if sub in known else module)
    found.discard(name)
    return found


def layer(name: str) -> int:
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[key]


def graph() -> dict[str, set[str]]:
    return {name: imports_of(path, name) for name, path in modules().items()}


def test_every_module_has_a_layer():
    unknown = [n for n in modules() if n.split(".")[1:2] and n.split(".")[1] not in LAYERS]
    assert unknown == []


def test_nothing_imports_upward():
    upward = [
        f"{src} -> {dst}"
        for src, dsts in graph().items()
        for dst in dsts
        if dst != "sae_pipeline" and layer(dst) > layer(src)
    ]
    assert upward == [], "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = {n: {d for d in ds if d != "sae_pipeline"} for n, ds in graph().items()}
    # Package __init__ files are re-export points, not dependencies of their submodules.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d) :], d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_short(name):
    lines = len(modules()[name].read_text().splitlines())
    if name in LONG_MODULES:
        return
    assert lines <= MAX_LINES, f"{name} has {lines} lines (limit {MAX_LINES})"


def test_top_level_holds_only_the_shared_modules():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "boundary", "cli", "config", "errors", "storage"]


def test_the_checks_can_fail(tmp_path):
    """The walker sees function-level imports, so an upward one cannot hide inside a function."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from sae_pipeline.steps import training\n")
    assert "sae_pipeline.steps.training" in imports_of(src, "sae_pipeline.data.m")


def test_relative_imports_are_resolved_and_an_upward_one_is_caught(tmp_path):
    """``from ..steps import training`` in engine/net.py is as upward as the absolute form."""
    src = tmp_path / "net.py"
    src.write_text("from ..steps import training\nfrom . import trainer\nfrom .. import errors\n")
    found = imports_of(src, "sae_pipeline.engine.net")
    assert found == {
        "sae_pipeline.steps.training",
        "sae_pipeline.engine.trainer",
        "sae_pipeline.errors",
    }
    assert [d for d in found if layer(d) > layer("sae_pipeline.engine.net")]
    init = tmp_path / "__init__.py"  # in a package's __init__, `.` is the package itself
    init.write_text("from .trainer import fit\nfrom ..registry import gate\n")
    found = imports_of(init, "sae_pipeline.engine")
    assert found == {"sae_pipeline.engine.trainer", "sae_pipeline.registry.gate"}
