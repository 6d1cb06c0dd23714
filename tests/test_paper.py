"""Unit tests of msl_kit.reports.paper: run tables, protocols, the paper's numbers, exports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from msl_kit import viz
from msl_kit.reports import paper


# ----------------------------------------------------------------------------- tables
def _fake_run(folder: Path, dataset: str, dim: int, r1: float, ks=(1, 2, 4, 8)) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"name": dataset},
                "model": {"embedding_dim": dim, "backbone": "bninception"},
                "loss": {"name": "ms"},
            }
        )
    )
    metrics = {f"recall@{k}": min(1.0, r1 + 0.05 * i) for i, k in enumerate(ks)}
    metrics.update({"map@r": r1 / 2, "r_precision": r1 / 1.5, "iteration": 3000, "split": "test"})
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "history.csv").write_text(
        f"iteration,loss,recall@1\n10,1.0,\n20,0.9,0.5\n30,0.8,{r1}\n"
    )
    return folder


def test_collect_runs_and_compare_with_the_papers_numbers(tmp_path):
    _fake_run(tmp_path / "a" / "cub512", "cub200", 512, 0.66)
    _fake_run(tmp_path / "b", "digits", 64, 0.93)
    table = paper.collect_runs(tmp_path)
    assert list(table["run"]) == ["cub512", "b"]  # sorted by folder path
    cub = table.set_index("run").loc["cub512"]
    assert cub["R@1"] == pytest.approx(66.0) and cub["MAP@R"] == pytest.approx(33.0)
    full = paper.compare_with_paper(table)
    reported = full[full["source"] == "paper"]
    assert list(reported["dataset"]) == ["cub200"] and list(reported["dim"]) == [512]  # not 64-d
    assert list(reported["protocol"]) == ["best"]  # the released trainer's best test evaluation
    assert set(full[full["source"] == "run"]["protocol"]) == {"final"}
    assert reported.iloc[0]["R@32"] == 97.3 and math.isnan(reported.iloc[0]["MAP@R"])
    assert set(full[full["source"] == "reference"]["run"]) == {
        "Proxy-Anchor",
        "Proxy-Anchor (released model)",
        "Contrastive + XBM",
    }
    cols = list(full.columns)
    assert cols[:6] == ["run", "source", "protocol", "at", "dataset", "dim"]
    assert [c for c in cols if c.startswith("R@")] == ["R@1", "R@2", "R@4", "R@8", "R@16", "R@32"]


def test_export_table_writes_markdown_and_latex(tmp_path):
    _fake_run(tmp_path / "runs" / "cub512", "CUB-200-2011", 512, 0.66)
    full = paper.compare_with_paper(paper.collect_runs(tmp_path / "runs"))
    md, tex = paper.export_table(full, tmp_path / "out" / "table")
    lines = md.read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(full.columns) and len(lines) == 2 + len(full)
    first_row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert first_row[header.index("R@1")] == "66.0" and first_row[header.index("dim")] == "512"
    text = tex.read_text()
    assert "\\begin{tabular}" in text and "\\bottomrule" in text
    body = [row for row in text.splitlines() if row.endswith("\\\\")]
    ampersands = len(full.columns) - 1
    assert all(row.count("&") == ampersands for row in body) and len(body) == 1 + len(full)
    assert "MS (paper)" in text and "nan" not in text and "<NA>" not in md.read_text()


def test_paper_table_holds_the_design_numbers():
    t = paper.paper_table("CUB-200-2011", 512)
    ms = t[t["run"] == "MS (paper)"].iloc[0]
    assert [ms[f"R@{k}"] for k in (1, 2, 4, 8, 16, 32)] == [65.7, 77.0, 86.3, 91.2, 95.0, 97.3]
    sop = paper.paper_table("sop", 512).iloc[0]
    assert sop[["R@1", "R@10", "R@100"]].tolist() == [78.2, 90.5, 96.0]
    assert paper.canonical_dataset("Cars196") == "cars196"
    assert paper.canonical_dataset("In-Shop") == "inshop"
    assert len(paper.paper_table("digits")) == 0


def test_missing_runs_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="msl-kit train"):
        paper.collect_runs(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="msl-kit train"):
        paper.collect_runs(tmp_path)
    _fake_run(tmp_path / "r", "digits", 64, 0.9)
    with pytest.raises(ValueError, match="map@r"):
        viz.recall_curves(tmp_path, "map@r")


def _with_best(run: Path, best_r1: float, at: int) -> Path:
    """Add metrics.json's "best" (best of the evaluations) and "floors", as engine.train does."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["best"] = {
        "iteration": at,
        "recall@1": best_r1,
        "recall@2": best_r1 + 0.05,
        "map@r": 0.3,
    }
    metrics["floors"] = {
        "raw_pixels": {"recall@1": 0.348, "map@r": 0.062},
        "untrained": {"recall@1": 0.241, "map@r": 0.048},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_tables_name_their_protocol_and_the_paper_is_compared_with_best(tmp_path):
    _with_best(_fake_run(tmp_path / "cub512", "cub200", 512, 0.60), 0.64, 1200)
    _fake_run(tmp_path / "old", "cub200", 512, 0.50)  # a run from before "best" was recorded
    table = paper.collect_runs(tmp_path, protocols=("best", "final"))
    rows = [tuple(r) for r in table[["run", "protocol", "at", "R@1"]].itertuples(index=False)]
    assert rows == [
        ("cub512", "best", 1200, 64.0),
        ("cub512", "final", 3000, 60.0),
        ("old", "final", 3000, 50.0),
    ]
    full = paper.compare_with_paper(table)
    ms = full[full["run"] == "MS (paper)"].iloc[0]
    assert ms["protocol"] == "best" and ms["R@1"] == 65.7
    assert set(full[full["source"] == "reference"]["protocol"]) == {"reported"}
    assert set(paper.PROTOCOLS) >= set(full["protocol"])  # every protocol is explained
    with pytest.raises(ValueError, match="records no best"):
        paper.load_run(tmp_path / "old", "best")
    with pytest.raises(ValueError, match="protocol must be"):
        paper.load_run(tmp_path / "old", "median")


def test_results_table_puts_the_run_beside_its_floors(tmp_path):
    run = _with_best(_fake_run(tmp_path / "r", "omniglot_small", 64, 0.70), 0.72, 100)
    t = paper.results_table(run)
    assert list(t.index) == [
        "raw pixels",
        "untrained network",
        "trained: final",
        "trained: best of evaluations",
    ]
    assert t["R@1"].tolist() == [34.8, 24.1, 70.0, 72.0]
    assert t["MAP@R"].tolist() == [6.2, 4.8, 35.0, 30.0]
    assert t["at"].tolist()[1:] == [0, 3000, 100]
