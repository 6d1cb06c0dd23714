"""Sweeps over dotted config keys: what a sweep runs (`spec`: grids, ranges, named studies, each
cell's config and its hash, the sweep folder, the tables; no Optuna) and how (`runner`: Optuna,
one run folder per cell, workers, signals). The public names are gathered here; the folder and
worker machinery stays in its modules."""

from msl_kit.sweep.runner import run_cell, run_sweep, write_tables
from msl_kit.sweep.spec import (
    STUDY_DIR,
    SweepError,
    SweepSpec,
    cell_config,
    cell_name,
    cells,
    config_hash,
    load_study,
    make_spec,
    parse_grid,
    parse_range,
)

__all__ = [
    "STUDY_DIR",
    "SweepError",
    "SweepSpec",
    "cell_config",
    "cell_name",
    "cells",
    "config_hash",
    "load_study",
    "make_spec",
    "parse_grid",
    "parse_range",
    "run_cell",
    "run_sweep",
    "write_tables",
]
