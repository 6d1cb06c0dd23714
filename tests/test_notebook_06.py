"""Notebook 06 (sensitivity heatmaps): stored clean and thin; executed headless on a 2 x 2 grid.

Uses the papermill helpers of test_notebooks.py (execute, outputs, mimes)."""

from __future__ import annotations

import ast
import re

import nbformat
import pandas as pd
import pytest
from test_notebooks import NOTEBOOKS, execute, mimes, outputs

NAME = "06_sensitivity"


def test_06_is_stored_clean_thin_with_parameters_and_kernelspec():
    nb = nbformat.read(NOTEBOOKS / f"{NAME}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "strip the outputs"
    assert "parameters" in code[0].metadata.get("tags", [])
    ast.parse(code[0].source)
    assert any(re.search(r"^from msl_kit[.\w]* import ", c.source, re.M) for c in code)
    for cell in code:
        source = "\n".join(line for line in cell.source.splitlines() if not line.startswith("%"))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.end_lineno - node.lineno < 10, f"move {node.name} into msl_kit"


@pytest.mark.slow
def test_06_runs_the_sweeps_and_draws_both_heatmaps(tmp_path):
    nb = execute(NAME, tmp_path, sweep_dir=str(tmp_path / "sweeps"), out_dir=str(tmp_path / "06"))
    for name, keys in (
        ("beta_lam", ["loss.ms.beta", "loss.ms.lam"]),
        ("alpha_eps", ["loss.ms.alpha", "loss.ms.margin"]),
    ):
        rows = pd.read_csv(tmp_path / "sweeps" / name / "sweep.csv")
        assert len(rows) == 4 and set(keys) <= set(rows.columns)
        assert (tmp_path / "06" / f"sensitivity_{name}.png").stat().st_size > 5000
    assert "text/html" in mimes(outputs(nb, 'summaries["alpha_eps"]'))
    assert "image/png" in mimes(outputs(nb, 'x="loss.ms.beta", y="loss.ms.lam"'))
    assert "image/png" in mimes(outputs(nb, 'x="loss.ms.alpha", y="loss.ms.margin"'))
