"""Imports run only downward (docs/ARCHITECTURE.md). Library modules are checked; command-line entry points
(``__main__.py``), which assemble layers, may also look sideways."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "repablate"

# layer -> the repablate layers its library modules may import (besides itself)
ALLOWED = {
    "nn": set(),
    "models": {"nn"},
    "data": set(),
    "bench": {"nn"},
    "train": {"nn", "models", "data", "bench", "paths"},
    "analysis": set(),
}


def repablate_imports(path: Path) -> set[str]:
    """The first component under ``repablate`` of every import in ``path`` (e.g. 'nn' for repablate.nn.fusion)."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        layers |= {name.split(".")[1] for name in names if name.startswith("repablate.") and name.count(".") >= 1}
    return layers


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_run_only_downward(layer):
    for path in sorted((PACKAGE / layer).glob("*.py")):
        if path.name == "__main__.py":
            continue
        upward = repablate_imports(path) - ALLOWED[layer] - {layer}
        assert not upward, f"{path.relative_to(PACKAGE.parent)} imports repablate.{sorted(upward)}"


def test_nn_imports_torch_only():
    third_party = set()
    for path in (PACKAGE / "nn").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                third_party |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                third_party.add(node.module.split(".")[0])
    assert third_party - {"torch", "repablate", "__future__", "copy", "collections", "typing", "math"} == set()
