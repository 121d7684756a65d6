"""Imports run only downward (docs/ARCHITECTURE.md). Library modules are checked; command-line entry points
(``__main__.py``), which assemble layers, may also look sideways. ``repablate.results``, the schema of the files
a run writes, is below everything: the standard library only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "repablate"

# layer -> the repablate layers its library modules may import (besides itself)
ALLOWED = {
    "nn": set(),
    "models": {"nn"},
    "data": set(),
    "bench": {"nn"},
    "train": {"nn", "models", "data", "bench", "paths", "results"},
    "analysis": {"results"},
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


def _top_level_imports(path: Path) -> set[str]:
    """The top-level package of every absolute import in ``path``."""
    packages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            packages |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            packages.add(node.module.split(".")[0])
    return packages


def test_results_imports_the_standard_library_only():
    path = PACKAGE / "results.py"
    assert _top_level_imports(path) <= set(sys.stdlib_module_names), "repablate.results imports more than the stdlib"
    tree = ast.parse(path.read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]  # no relative


def test_train_and_analysis_share_the_results_schema_and_analysis_never_imports_train():
    for layer in ("train", "analysis"):
        assert any("results" in repablate_imports(path) for path in (PACKAGE / layer).glob("*.py")), layer
    for path in sorted((PACKAGE / "analysis").glob("*.py")):  # the CLI included
        assert "train" not in repablate_imports(path), f"{path.relative_to(PACKAGE.parent)} imports repablate.train"


def test_nn_imports_torch_only():
    third_party = set().union(*(_top_level_imports(path) for path in (PACKAGE / "nn").glob("*.py")))
    assert third_party - {"torch", "repablate", "__future__", "copy", "collections", "typing", "math"} == set()
