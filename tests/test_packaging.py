"""The package list in pyproject.toml is written by hand (conf/ ships as repablate.conf); keep it complete."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "repablate").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found | {"repablate.conf"} == listed
