"""The five notebooks: stored clean, and executed headless with papermill in order on the CPU.

02 trains a small digits run; 03 and 04 read its checkpoint; 05 gathers it with a run folder
that claims the CUB 512-d setting, so the paper's rows must appear beside it.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_prepare_data", "02_train", "03_pair_weights", "04_embeddings_umap", "05_recall_tables"]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


# ----------------------------------------------------------------------------- stored form (fast)
@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_clean_with_parameters_and_kernelspec(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "strip the outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0]
    ast.parse(tagged[0].source)  # plain assignments papermill can override
    assert any("from msl_kit import" in c.source for c in code)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_stays_thin(name):
    """Logic lives in msl_kit: no function or class in a notebook longer than 10 lines."""
    for cell in read(name).cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(l for l in cell.source.splitlines() if not l.startswith("%"))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.end_lineno - node.lineno < 10, f"move {node.name} into msl_kit"


# ----------------------------------------------------------------------------- executed (slow)
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def execute(name: str, work: Path, **parameters) -> nbformat.NotebookNode:
    import papermill

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the kernel inherits it; 2 shared cores here
    out = work / f"{name}.out.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=parameters,
                               kernel_name="python3", cwd=str(work), progress_bar=False,
                               execution_timeout=600)
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    return nb


def outputs(nb: nbformat.NotebookNode, fragment: str) -> list:
    """The outputs of the (first) code cell whose source contains `fragment`."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and fragment in c.source)
    return cell.outputs


def mimes(outs: list) -> set[str]:
    return {m for o in outs for m in o.get("data", {})}


@pytest.fixture(scope="module")
def run_dir(work):
    return work / "runs" / "digits_ms"


@pytest.fixture(scope="module")
def nb02(work, run_dir):
    return execute("02_train", work, iterations=30, eval_every=10, run_dir=str(run_dir))


@pytest.mark.slow
def test_01_prepare_data(work):
    nb = execute("01_prepare_data", work, out_dir=str(work / "01"), per_class=3, max_classes=2)
    counts = pd.read_csv(work / "01" / "class_counts.csv")
    assert list(counts.columns) == ["split", "images", "classes", "min/class", "median/class", "max/class"]
    assert counts.set_index("split")["classes"].to_dict() == {"train": 5, "test": 5}
    assert counts["images"].sum() == 1797  # every digit, in exactly one split
    assert (work / "01" / "samples.png").stat().st_size > 1000
    assert "image/png" in mimes(outputs(nb, "viz.sample_grid"))
    assert "text/html" in mimes(outputs(nb, "viz.dataset_overview()"))  # the registry table


@pytest.mark.slow
def test_01_prepares_the_real_cub_subset_from_an_archive(work, shared_data):
    archive = shared_data / "CUB_200_2011_subset100.tgz"
    nb = execute("01_prepare_data", work, dataset="cub200", root=str(work / "data"), archive=str(archive),
                 out_dir=str(work / "01cub"), per_class=3, max_classes=2)
    counts = pd.read_csv(work / "01cub" / "class_counts.csv").set_index("split")
    assert counts["classes"].to_dict() == {"train": 58, "test": 42}  # species 1-100 / 101-200
    assert counts["images"].sum() == 5902
    assert "prepared cub200" in "".join(o.get("text", "") for o in outputs(nb, "datasets.prepare("))
    assert (work / "01cub" / "samples.png").stat().st_size > 10_000


@pytest.mark.slow
def test_02_train_writes_a_run_and_draws_live_curves(nb02, run_dir):
    for name in ("config.yaml", "history.csv", "checkpoint.pt", "best.pt", "metrics.json", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["iterations"] == 30
    history = pd.read_csv(run_dir / "history.csv")
    assert history.dropna(subset=["recall@1"])["iteration"].tolist() == [10, 20, 30]
    live = outputs(nb02, "LiveCurves()")
    assert [o.output_type for o in live] == ["display_data"] and "image/png" in mimes(live)  # one, updated
    table = outputs(nb02, "paper.collect_runs(run_dir)")[0]["data"]["text/html"]
    for col in ("R@1", "R@8", "MAP@R", "RP", "dataset", "dim"):
        assert f">{col}<" in table


@pytest.mark.slow
def test_03_pair_weights(nb02, work, run_dir):
    nb = execute("03_pair_weights", work, checkpoint=str(run_dir), out_dir=str(work / "03"))
    for name in ("ms_weights.png", "gpw.png"):
        assert (work / "03" / name).stat().st_size > 1000
    assert "image/png" in mimes(outputs(nb, "viz.similarity_heatmap"))
    assert "image/png" in mimes(outputs(nb, "viz.similarity_histograms"))
    assert WIDGET_VIEW in mimes(outputs(nb, "widgets.pair_weight_explorer"))  # the sliders
    assert "image/png" in mimes(outputs(nb, "viz.gpw_figure"))
    # digits' train split has 5 classes, so P = 8 becomes 5
    assert "batch of 20: 5 classes x 4" in outputs(nb, "explore.load_model")[0]["text"]


@pytest.mark.slow
def test_04_embeddings_umap(nb02, work, run_dir):
    nb = execute("04_embeddings_umap", work, checkpoint=str(run_dir), max_items=300, n_thumbnails=15,
                 out_dir=str(work / "04"))
    for name in ("embeddings.png", "retrieval.png"):
        assert (work / "04" / name).stat().st_size > 1000
    assert "300 test items of 5 classes" in outputs(nb, "explore.split_embeddings")[0]["text"]
    assert "image/png" in mimes(outputs(nb, "viz.embeddings_before_after"))
    assert "image/png" in mimes(outputs(nb, "viz.retrieval_grid"))


@pytest.mark.slow
def test_05_recall_tables(nb02, work, run_dir):
    cub = work / "runs" / "cub512"  # a finished run in the paper's setting, written by hand
    cub.mkdir(parents=True, exist_ok=True)
    (cub / "config.yaml").write_text(yaml.safe_dump({"data": {"name": "cub200"}, "model": {"embedding_dim": 512}}))
    (cub / "metrics.json").write_text(json.dumps({"recall@1": 0.6, "recall@2": 0.7, "map@r": 0.2, "iteration": 20}))
    (cub / "history.csv").write_text("iteration,loss,recall@1\n10,1.0,0.5\n20,0.9,0.6\n")
    nb = execute("05_recall_tables", work, runs=str(work / "runs"), out_dir=str(work / "05"))
    md = (work / "05" / "recall_table.md").read_text().splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header[:4] == ["run", "source", "dataset", "dim"] and {"R@1", "R@2", "MAP@R"} <= set(header)
    rows = {r.split("|")[1].strip(): r for r in md[2:]}
    assert set(rows) == {"digits_ms", "cub512", "MS (paper)", "Proxy-Anchor", "Contrastive + XBM"}
    assert "65.7" in rows["MS (paper)"] and "97.3" in rows["MS (paper)"]
    tex = (work / "05" / "recall_table.tex").read_text()
    assert "\\begin{tabular}" in tex and "MS (paper)" in tex
    assert (work / "05" / "recall_curves.png").stat().st_size > 1000
    assert "image/png" in mimes(outputs(nb, "viz.recall_curves"))
    assert "text/html" in mimes(outputs(nb, "paper.compare_with_paper"))
