"""Notebook 06 (sensitivity heatmaps): stored clean and thin; executed headless on a 2 x 2 grid.

Uses the papermill helpers of test_notebooks.py (execute, outputs, mimes)."""

from __future__ import annotations

import ast
import re

import pandas as pd
import pytest
from helpers import LazyModule
from test_notebooks import NOTEBOOKS, execute, mimes, outputs

# nbformat imports jsonschema's format checkers, seconds at import: load it when a test uses it,
# not while every worker collects
nbformat = LazyModule("nbformat")

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


@pytest.mark.notebook
@pytest.mark.subprocess
@pytest.mark.slow
def test_06_runs_the_sweeps_and_draws_both_heatmaps(tmp_path):
    # config="digits", the notebook's own parameter: each of the 8 cells evaluates 360 test
    # digits instead of the 2,240 Omniglot characters that took most of a cell; the sweep code
    # on the default config is tests/sweep's.
    work = {"sweep_dir": str(tmp_path / "sweeps"), "out_dir": str(tmp_path / "06")}
    nb = execute(NAME, tmp_path, config="digits", **work)
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
