"""pyproject.toml tells the truth: the package list (written by hand, conf/ ships as repablate.conf), the core
dependencies (everything the package imports), the extras, and the console scripts."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "repablate").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found | {"repablate.conf"} == listed


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports() -> set[str]:
    """Top-level names of every module that repablate's own code imports, outside the standard library."""
    names = set()
    for path in (ROOT / "repablate").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != "repablate"}


def test_every_import_of_the_package_is_a_declared_core_dependency():
    """What repablate imports is installed by `pip install repablate`, not only by an extra."""
    core = {_requirement_name(spec) for spec in PYPROJECT["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(_third_party_imports()):
        provided_by = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        # lightning ships lightning_fabric/pytorch_lightning under its own name; yaml comes from PyYAML.
        if not provided_by & core:
            undeclared[module] = sorted(provided_by)
    assert undeclared == {}


def test_extras_hold_only_what_some_users_need():
    core = {_requirement_name(spec) for spec in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"pycocotools", "hydra-joblib-launcher", "hydra-submitit-launcher"}.isdisjoint(core)
    assert {"detect", "joblib", "slurm", "dev"} <= set(extras)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(PYPROJECT["project"]["scripts"]))
def test_console_scripts_are_installed_and_answer_help(script):
    """`pip install -e .` puts each [project.scripts] entry beside the interpreter; each prints its help."""
    executable = Path(sys.executable).parent / script
    assert executable.is_file(), f"{script} is not installed: run pip install -e '.[dev]'"
    done = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower() or "== config groups ==" in done.stdout.lower() or script in done.stdout
