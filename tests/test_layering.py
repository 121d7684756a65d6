"""Imports run only downward (docs/ARCHITECTURE.md). Library modules are checked; command-line entry points
(``__main__.py``, the command-line functions of ``repablate/export.py``), which assemble layers, may also look
sideways. ``repablate.results``, the schema of the files
a run writes, is below everything: the standard library only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "repablate"

# layer -> the repablate layers its library modules may import (besides itself)
# repablate.results (the files a run writes) and repablate.paths (where conf/ is) import the standard library only,
# so every layer above the ground floor may use them.
FOUNDATION = {"paths", "results"}
ALLOWED = {
    "nn": set(),
    "models": {"nn"} | FOUNDATION,
    "data": FOUNDATION,
    "bench": {"nn"} | FOUNDATION,
    "train": {"nn", "models", "data", "bench", "export"} | FOUNDATION,  # export: repablate/export.py
    "analysis": FOUNDATION,
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


# repablate/export.py: the export library stands on these; its command line (these functions) may look sideways.
EXPORT_ALLOWED = {"nn", "bench", "results"}
EXPORT_CLI_FUNCTIONS = {"main", "load_deployed"}


def test_export_stands_on_nn_bench_and_results_and_only_its_cli_looks_sideways():
    path = PACKAGE / "export.py"
    tree = ast.parse(path.read_text())
    sideways = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in EXPORT_CLI_FUNCTIONS:
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and inner.module and inner.module.startswith("repablate."):
                sideways.add(inner.module.split(".")[1])
            elif isinstance(inner, ast.Import):
                sideways |= {alias.name.split(".")[1] for alias in inner.names if alias.name.startswith("repablate.")}
    assert sideways <= EXPORT_ALLOWED, f"repablate/export.py imports repablate.{sorted(sideways - EXPORT_ALLOWED)}"
    assert repablate_imports(path) - EXPORT_ALLOWED <= {"inspect"}  # the CLI reads checkpoints through inspect


def test_bench_never_imports_export():
    """The bench CLI may export (it looks sideways); the bench library takes ONNX graphs, never repablate.export."""
    for path in sorted((PACKAGE / "bench").glob("*.py")):
        if path.name != "__main__.py":
            assert "export" not in repablate_imports(path), f"{path.relative_to(PACKAGE.parent)} imports export"


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
