"""The paper's reported numbers, and tables of run folders beside them.

A run folder is what `engine.train` writes, read through `train.rundir.RunFolder` (its config,
metrics and history). Tables are pandas DataFrames in percent, so runs and the paper's numbers
share one scale.
pandas is imported inside the functions: `import msl_kit.reports.paper` stays cheap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from msl_kit.files.safe_yaml import load_yaml
from msl_kit.train.rundir import RunFolder

if TYPE_CHECKING:
    import pandas as pd

# BN-Inception backbone, Recall@K in %, as reported (MS: Wang et al., CVPR 2019, tables 1-4;
# Proxy-Anchor: Kim et al., CVPR 2020; contrastive + XBM: Wang et al., CVPR 2020).
PAPER_RESULTS: list[dict] = [
    {
        "method": "MS (paper)",
        "dataset": "cub200",
        "dim": 64,
        "recall": {1: 57.4, 2: 69.8, 4: 80.0, 8: 87.8, 16: 93.2, 32: 96.4},
    },
    {
        "method": "MS (paper)",
        "dataset": "cub200",
        "dim": 512,
        "recall": {1: 65.7, 2: 77.0, 4: 86.3, 8: 91.2, 16: 95.0, 32: 97.3},
    },
    {
        "method": "MS (paper)",
        "dataset": "cars196",
        "dim": 512,
        "recall": {1: 84.1, 2: 90.4, 4: 94.0, 8: 96.5},
    },
    {
        "method": "MS (paper)",
        "dataset": "sop",
        "dim": 512,
        "recall": {1: 78.2, 10: 90.5, 100: 96.0},
    },
    {
        "method": "MS (paper)",
        "dataset": "inshop",
        "dim": 512,
        "recall": {1: 89.7, 10: 97.9, 20: 98.5, 30: 98.8},
    },
    {"method": "Proxy-Anchor", "dataset": "cub200", "dim": 512, "recall": {1: 68.4}},
    {"method": "Proxy-Anchor", "dataset": "cars196", "dim": 512, "recall": {1: 86.1}},
    {"method": "Proxy-Anchor", "dataset": "sop", "dim": 512, "recall": {1: 79.1}},
    {"method": "Proxy-Anchor", "dataset": "inshop", "dim": 512, "recall": {1: 91.5}},
    # The authors' released BN-Inception checkpoints, as their README reports them (more K).
    {
        "method": "Proxy-Anchor (released model)",
        "dataset": "cub200",
        "dim": 512,
        "recall": {1: 69.1, 2: 78.9, 4: 86.1, 8: 91.2},
    },
    {
        "method": "Proxy-Anchor (released model)",
        "dataset": "cars196",
        "dim": 512,
        "recall": {1: 86.4, 2: 91.9, 4: 95.0, 8: 97.0},
    },
    {
        "method": "Proxy-Anchor (released model)",
        "dataset": "sop",
        "dim": 512,
        "recall": {1: 79.2, 10: 90.7, 100: 96.2, 1000: 98.6},
    },
    {
        "method": "Proxy-Anchor (released model)",
        "dataset": "inshop",
        "dim": 512,
        "recall": {1: 91.9, 10: 98.1, 20: 98.7, 30: 99.0, 40: 99.1},
    },
    {"method": "Contrastive + XBM", "dataset": "cub200", "dim": 512, "recall": {1: 65.8}},
    {"method": "Contrastive + XBM", "dataset": "sop", "dim": 512, "recall": {1: 79.5}},
]

# Where each method's numbers come from (notebook 05 prints this beside the table).
SOURCES = {
    "MS (paper)": "Wang, Han, Huang, Dong, Scott: Multi-Similarity Loss with General Pair "
    "Weighting for Deep Metric Learning, CVPR 2019, tables 1-4",
    "Proxy-Anchor": "Kim, Kim, Cho, Kwak: Proxy Anchor Loss for Deep Metric Learning, CVPR "
    "2020, tables 1-2, Inception-BN 512-d; R@1 only: the paper's R@2 and beyond were not "
    "verified here, so they are left out",
    "Proxy-Anchor (released model)": "github.com/tjddus9597/Proxy-Anchor-CVPR2020 README, "
    "the authors' released Inception-BN 512-d checkpoints (read from the README, not re-run)",
    "Contrastive + XBM": "Wang, Zhang, Huang, Scott: Cross-Batch Memory for Embedding "
    "Learning, CVPR 2020 (R@1 as DESIGN.md lists it)",
}

# Which numbers a table row holds. The released trainer evaluates R@1 on the test set every
# 200 iterations and reports the best of those evaluations (its last update is never
# evaluated), so the paper's MS numbers are "best"; a run has both (metrics.json "best").
PROTOCOLS = {
    "best": "best R@1 of the evaluations during training (the released trainer's protocol)",
    "final": "the model after the last update",
    "reported": "as the paper reports it",
}

# registry names and the spellings people use for them
_ALIASES = {
    "cub": "cub200",
    "cub200": "cub200",
    "cub2002011": "cub200",
    "cars": "cars196",
    "cars196": "cars196",
    "sop": "sop",
    "stanfordonlineproducts": "sop",
    "products": "sop",
    "inshop": "inshop",
    "deepfashioninshop": "inshop",
}


def canonical_dataset(name: str) -> str:
    """The paper table's key for a dataset name ("CUB-200-2011" -> "cub200"); unknown names as
    given."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return _ALIASES.get(key, str(name))


def paper_table(dataset: str | None = None, dim: int | None = None) -> pd.DataFrame:
    """The reported numbers as rows (source, method, dataset, dim, R@K...), optionally filtered."""
    import pandas as pd

    rows = []
    for entry in PAPER_RESULTS:
        if dataset is not None and entry["dataset"] != canonical_dataset(dataset):
            continue
        if dim is not None and entry["dim"] != int(dim):
            continue
        ours = "paper" in entry["method"]  # MS as released: best of its test evaluations
        row = {
            "run": entry["method"],
            "source": "paper" if ours else "reference",
            "protocol": "best" if ours else "reported",
            "dataset": entry["dataset"],
            "dim": entry["dim"],
        }
        row.update({f"R@{k}": v for k, v in entry["recall"].items()})
        rows.append(row)
    return _order_columns(pd.DataFrame(rows))


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run folders (holding metrics.json) under a root folder, or the given folders, sorted."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            found.update(run.path for run in RunFolder.find(path))
        else:
            raise FileNotFoundError(
                f"{path} is neither a run folder nor a folder of runs; "
                "train one first (msl-kit train --out DIR)"
            )
    return sorted(found)


def _percent(metrics: dict) -> dict:
    """R@K, MAP@R and RP columns (%) of a metrics mapping."""
    row = {
        f"R@{k.split('@')[1]}": round(100.0 * v, 2)
        for k, v in metrics.items()
        if k.startswith("recall@")
    }
    for key, col in (("map@r", "MAP@R"), ("r_precision", "RP")):
        if key in metrics:
            row[col] = round(100.0 * metrics[key], 2)
    return row


def load_run(run_dir: str | Path, protocol: str = "final") -> dict:
    """One run's table row (metrics in %) under `protocol` (see PROTOCOLS): run, source,
    protocol, at (the iteration the numbers are from), dataset, dim, backbone, loss,
    iterations (of the whole run), split, R@K, MAP@R, RP. ValueError for "best" where the
    run recorded no best (runs from before metrics.json had one)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, not {protocol!r}")
    run = RunFolder(run_dir)
    metrics = run.read_metrics()
    cfg = (load_yaml(run.config.read_text(), str(run.config)) or {}) if run.config.is_file() else {}
    data, model, loss = cfg.get("data", {}), cfg.get("model", {}), cfg.get("loss", {})
    numbers, at = metrics, metrics.get("iteration")
    if protocol == "best":
        if not isinstance(metrics.get("best"), dict) or "recall@1" not in metrics["best"]:
            raise ValueError(f"{run.metrics} records no best evaluation")
        numbers, at = metrics["best"], metrics["best"].get("iteration")
    row = {
        "run": run.path.name,
        "source": "run",
        "protocol": protocol,
        "at": at,
        "dataset": canonical_dataset(data.get("name", "?")),
        "dim": model.get("embedding_dim"),
        "backbone": model.get("backbone"),
        "loss": loss.get("name"),
        "iterations": metrics.get("iteration"),
        "split": metrics.get("split"),
        # how Recall@K was counted; runs from before the option counted such queries as misses
        "lone_queries": metrics.get("lone_queries", "miss"),
    }
    return {**row, **_percent(numbers)}


def collect_runs(
    paths: str | Path | Iterable[str | Path], protocols: Sequence[str] = ("final",)
) -> pd.DataFrame:
    """Every run under `paths` as one table (metrics in %), one row per run and protocol
    (`("best", "final")`: both, best first); a run without a recorded best has no best row."""
    import pandas as pd

    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(
            f"no finished run folder (with {RunFolder.METRICS}) under {paths}; "
            "train one first (msl-kit train --out DIR)"
        )
    rows = []
    for run in runs:
        for protocol in protocols:
            try:
                rows.append(load_run(run, protocol))
            except ValueError:
                if protocol != "best":
                    raise
    return _order_columns(pd.DataFrame(rows))


def compare_with_paper(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs followed, per (dataset, dim) they cover, by the reported numbers for it.

    The paper's MS numbers follow the "best" protocol (the released trainer's best test
    evaluation), so compare them with the runs' "best" rows; give `collect_runs` both
    protocols to keep each run's final value beside its best.
    """
    import pandas as pd

    parts = [runs]
    for (dataset, dim), _ in runs.groupby(["dataset", "dim"], sort=False):
        parts.append(paper_table(dataset, dim))
    table = pd.concat([p for p in parts if len(p)], ignore_index=True)
    return _order_columns(table)


def results_table(run_dir: str | Path) -> pd.DataFrame:
    """One run's evaluation beside its floors (metrics.json), in %: raw pixels, the backbone as
    loaded (runs from pretrained weights), the untrained network, the final model and the best
    of the evaluations, with the iteration of each."""
    import pandas as pd

    metrics = RunFolder(run_dir).read_metrics()
    floors, best = metrics.get("floors") or {}, metrics.get("best") or {}
    lone = metrics.get("lone_queries", "miss")  # how Recall@K counted lone queries, every row
    rows = [
        {"model": "raw pixels", "at": None, **_percent(floors.get("raw_pixels", {}))},
        {"model": "backbone as loaded", "at": 0, **_percent(floors.get("backbone", {}))},
        {"model": "untrained network", "at": 0, **_percent(floors.get("untrained", {}))},
        {"model": "trained: final", "at": metrics.get("iteration"), **_percent(metrics)},
        {"model": "trained: best of evaluations", "at": best.get("iteration"), **_percent(best)},
    ]
    rows = [r for r in rows if "R@1" in r]  # floors are off for some datasets (eval.floors)
    table = pd.DataFrame(rows)
    table["at"] = table["at"].astype("Int64")
    table["lone_queries"] = lone
    return table.set_index("model")


def _order_columns(table: pd.DataFrame) -> pd.DataFrame:
    recall = sorted((c for c in table.columns if c.startswith("R@")), key=lambda c: int(c[2:]))
    first = [
        c
        for c in (
            "run",
            "source",
            "protocol",
            "at",
            "dataset",
            "dim",
            "backbone",
            "loss",
            "iterations",
            "split",
            "lone_queries",
        )
        if c in table.columns
    ]
    rest = [c for c in table.columns if c not in first and c not in recall]
    table = table[first + recall + rest].copy()
    for col in ("at", "dim", "iterations"):  # integers with gaps where the paper has no value
        if col in table:
            table[col] = table[col].astype("Int64")
    return table


def export_table(table: pd.DataFrame, stem: str | Path, *, digits: int = 1) -> tuple[Path, Path]:
    """Write `stem`.md (Markdown) and `stem`.tex (LaTeX booktabs) with `digits` decimals."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, tex = stem.with_suffix(".md"), stem.with_suffix(".tex")
    blanks = table.astype(object).where(table.notna(), None)  # tabulate blanks None, not nan / <NA>
    md.write_text(blanks.to_markdown(index=False, floatfmt=f".{digits}f", missingval="") + "\n")

    def fmt(value: float) -> str:
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return "" if missing else f"{value:.{digits}f}"

    tex.write_text(table.to_latex(index=False, float_format=fmt, na_rep="", escape=True))
    return md, tex
