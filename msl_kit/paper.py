"""The paper's reported numbers, and tables of run folders beside them.

A run folder is what `engine.train` writes (config.yaml, metrics.json, history.csv). Tables
are pandas DataFrames in percent, so runs and the paper's numbers share one scale.
pandas is imported inside the functions: `import msl_kit.paper` stays cheap.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import yaml

if TYPE_CHECKING:
    import pandas as pd

# BN-Inception backbone, Recall@K in %, as reported (MS: Wang et al., CVPR 2019, tables 1-4;
# Proxy-Anchor: Kim et al., CVPR 2020; contrastive + XBM: Wang et al., CVPR 2020).
PAPER_RESULTS: list[dict] = [
    {"method": "MS (paper)", "dataset": "cub200", "dim": 64,
     "recall": {1: 57.4, 2: 69.8, 4: 80.0, 8: 87.8, 16: 93.2, 32: 96.4}},
    {"method": "MS (paper)", "dataset": "cub200", "dim": 512,
     "recall": {1: 65.7, 2: 77.0, 4: 86.3, 8: 91.2, 16: 95.0, 32: 97.3}},
    {"method": "MS (paper)", "dataset": "cars196", "dim": 512,
     "recall": {1: 84.1, 2: 90.4, 4: 94.0, 8: 96.5}},
    {"method": "MS (paper)", "dataset": "sop", "dim": 512, "recall": {1: 78.2, 10: 90.5, 100: 96.0}},
    {"method": "MS (paper)", "dataset": "inshop", "dim": 512,
     "recall": {1: 89.7, 10: 97.9, 20: 98.5, 30: 98.8}},
    {"method": "Proxy-Anchor", "dataset": "cub200", "dim": 512, "recall": {1: 68.4}},
    {"method": "Proxy-Anchor", "dataset": "cars196", "dim": 512, "recall": {1: 86.1}},
    {"method": "Proxy-Anchor", "dataset": "sop", "dim": 512, "recall": {1: 79.1}},
    {"method": "Proxy-Anchor", "dataset": "inshop", "dim": 512, "recall": {1: 91.5}},
    {"method": "Contrastive + XBM", "dataset": "cub200", "dim": 512, "recall": {1: 65.8}},
    {"method": "Contrastive + XBM", "dataset": "sop", "dim": 512, "recall": {1: 79.5}},
]

# registry names and the spellings people use for them
_ALIASES = {"cub": "cub200", "cub200": "cub200", "cub2002011": "cub200", "cars": "cars196",
            "cars196": "cars196", "sop": "sop", "stanfordonlineproducts": "sop", "products": "sop",
            "inshop": "inshop", "deepfashioninshop": "inshop"}


def canonical_dataset(name: str) -> str:
    """The paper table's key for a dataset name ("CUB-200-2011" -> "cub200"); unknown names as given."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return _ALIASES.get(key, str(name))


def paper_table(dataset: str | None = None, dim: int | None = None) -> "pd.DataFrame":
    """The reported numbers as rows (source, method, dataset, dim, R@K...), optionally filtered."""
    import pandas as pd

    rows = []
    for entry in PAPER_RESULTS:
        if dataset is not None and entry["dataset"] != canonical_dataset(dataset):
            continue
        if dim is not None and entry["dim"] != int(dim):
            continue
        row = {"run": entry["method"], "source": "paper" if "paper" in entry["method"] else "reference",
               "dataset": entry["dataset"], "dim": entry["dim"]}
        row.update({f"R@{k}": v for k, v in entry["recall"].items()})
        rows.append(row)
    return _order_columns(pd.DataFrame(rows))


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run folders (holding metrics.json) under a root folder, or the given folders, sorted."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: set[Path] = set()
    for path in map(Path, paths):
        if (path / "metrics.json").is_file():
            found.add(path)
        elif path.is_dir():
            found.update(p.parent for p in path.rglob("metrics.json"))
        else:
            raise FileNotFoundError(f"{path} is neither a run folder nor a folder of runs; "
                                    "train one first (msl-kit train --out DIR)")
    return sorted(found)


def load_run(run_dir: str | Path) -> dict:
    """One run's table row: run, source, dataset, dim, backbone, loss, iterations, R@K, MAP@R (%)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} is missing: the run has not finished "
                                "(resume it with msl-kit train --resume DIR)")
    metrics = json.loads(metrics_path.read_text())
    cfg_path = run_dir / "config.yaml"
    cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    data, model, loss = cfg.get("data", {}), cfg.get("model", {}), cfg.get("loss", {})
    row = {"run": run_dir.name, "source": "run", "dataset": canonical_dataset(data.get("name", "?")),
           "dim": model.get("embedding_dim"), "backbone": model.get("backbone"),
           "loss": loss.get("name"), "iterations": metrics.get("iteration"),
           "split": metrics.get("split")}
    for key, value in metrics.items():
        if key.startswith("recall@"):
            row[f"R@{key.split('@')[1]}"] = round(100.0 * value, 2)
    for key, col in (("map@r", "MAP@R"), ("r_precision", "RP")):
        if key in metrics:
            row[col] = round(100.0 * metrics[key], 2)
    return row


def collect_runs(paths: str | Path | Iterable[str | Path]) -> "pd.DataFrame":
    """Every run under `paths` as one table, one row per run (metrics in %)."""
    import pandas as pd

    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no run folder (with metrics.json) under {paths}; "
                                "train one first (msl-kit train --out DIR)")
    return _order_columns(pd.DataFrame([load_run(r) for r in runs]))


def compare_with_paper(runs: "pd.DataFrame") -> "pd.DataFrame":
    """The runs followed, per (dataset, dim) they cover, by the reported numbers for it."""
    import pandas as pd

    parts = [runs]
    for (dataset, dim), _ in runs.groupby(["dataset", "dim"], sort=False):
        parts.append(paper_table(dataset, dim))
    table = pd.concat([p for p in parts if len(p)], ignore_index=True)
    return _order_columns(table)


def _order_columns(table: "pd.DataFrame") -> "pd.DataFrame":
    recall = sorted((c for c in table.columns if c.startswith("R@")), key=lambda c: int(c[2:]))
    first = [c for c in ("run", "source", "dataset", "dim", "backbone", "loss", "iterations", "split")
             if c in table.columns]
    rest = [c for c in table.columns if c not in first and c not in recall]
    table = table[first + recall + rest].copy()
    for col in ("dim", "iterations"):  # integers with gaps where the paper has no value
        if col in table:
            table[col] = table[col].astype("Int64")
    return table


def export_table(table: "pd.DataFrame", stem: str | Path, *, digits: int = 1) -> tuple[Path, Path]:
    """Write `stem`.md (Markdown) and `stem`.tex (LaTeX booktabs) with `digits` decimals."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, tex = stem.with_suffix(".md"), stem.with_suffix(".tex")
    blanks = table.astype(object).where(table.notna(), None)  # tabulate blanks None, not nan / <NA>
    md.write_text(blanks.to_markdown(index=False, floatfmt=f".{digits}f", missingval="") + "\n")

    def fmt(value: float) -> str:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    tex.write_text(table.to_latex(index=False, float_format=fmt, na_rep="", escape=True))
    return md, tex
