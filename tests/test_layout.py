"""The package's layout holds: imports run one way (no circle, lazy imports included), the layer
rules of docs/architecture.md, and that document names exactly the modules that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lwlora"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

PLUMBING = {"errors", "fields", "io", "similarity", "streaming", "blocks", "models", "data", "batching", "multimodal", "configs"}
#: layer -> the layers it must never import
FORBIDDEN = {
    "plumbing": {"selection", "adapters", "tasks", "evaluation", "training", "commands", "cli"},
    "selection": {"adapters", "tasks", "evaluation", "training", "commands", "cli"},
    "adapters": {"training", "commands", "cli"},
    "tasks": {"training", "commands", "cli"},
    "evaluation": {"training", "commands", "cli"},
    "training": {"commands", "cli"},
    "commands": {"cli"},
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(path: Path, known: set[str], name: str) -> set[str]:
    """The package modules ``path`` imports, anywhere in it (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:  # a name imported from a module: the module
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name and candidate != "lwlora":
                targets.add(candidate)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known), name) for name, path in known.items()}


def layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "root"
    top = parts[1]
    if top in PLUMBING:
        return "plumbing"
    return top


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_layer_rules_hold():
    broken = []
    for name, targets in graph().items():
        for target in targets:
            if layer(target) in FORBIDDEN.get(layer(name), set()):
                broken.append(f"{name} -> {target}")
    assert not broken, broken


def test_the_architecture_document_names_every_module_and_only_those():
    text = ARCHITECTURE.read_text()
    named = set(re.findall(r"`(lwlora/[\w/]+\.py)`", text))
    actual = {str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")}
    assert named - actual == set(), f"named but missing: {sorted(named - actual)}"
    assert actual - named == set(), f"not described in docs/architecture.md: {sorted(actual - named)}"


def test_a_circle_would_be_found(tmp_path, monkeypatch):
    """The checker itself: two modules importing each other lazily form a circle."""
    package = tmp_path / "lwlora"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from lwlora.b import g\n")
    (package / "b.py").write_text("from lwlora import a\n")
    import sys

    import pytest

    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)

    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle()
