"""The analysis notebooks are committed without outputs and run top to bottom on a real tiny sweep."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.test_sweeps import ROOT, tiny_sweep  # noqa: F401  (the session's shared real sweep)

NOTEBOOKS = sorted((ROOT / "analysis").glob("*.ipynb"))


def test_there_are_notebooks_for_tables_and_gradients():
    assert {"ablation_tables", "branch_gradients"} <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert any("parameters" in cell.metadata.get("tags", []) for cell in code)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_a_real_sweep(path, tiny_sweep, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    for name, value in {
        "REPABLATE_SWEEP_DIR": tiny_sweep["sweep_dir"],
        "REPABLATE_OUT_DIR": str(out),
        "PYTHONPATH": str(ROOT),
        "MPLBACKEND": "Agg",
    }.items():
        monkeypatch.setenv(name, value)  # the kernel inherits them
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1  # figures are shown, not only saved
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    if path.stem == "ablation_tables":
        assert figures == ["accuracy_vs_latency.png", "forms_flops_latency.png"]
        assert {"table.md", "table.tex", "table.csv", "runs.csv", "failures.csv"} <= {p.name for p in out.iterdir()}
        assert "lr_scale=-1 is not allowed" in (out / "table.md").read_text()  # the failures are in the table
    else:
        assert figures == ["branch_gradients.png"]
        text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
        assert "identity" in text and "1x1" in text  # RepConv's branches in the summary tables
