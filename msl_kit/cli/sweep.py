"""`msl-kit sweep`: a grid or a TPE search over dotted config keys, resumable by rerunning."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path


def _print_cell(run: dict) -> None:
    """One line per finished sweep cell (module-level: --jobs workers receive it pickled)."""
    print(
        f"{Path(run['run']).name}: R@1 {100 * run['recall@1']:.1f}  MAP@R "
        f"{100 * run['map@r']:.1f}  {run['wall_s']:.1f} s",
        flush=True,
    )


def _sweep_command(args: argparse.Namespace, out: Path) -> str:
    """The command that continues this sweep: the same arguments, with the --out it writes."""

    argv = ["msl-kit", "sweep"]
    for flag, value in (
        ("--study", args.study),
        ("--config", args.config),
        ("--seeds", args.seeds),
        ("--trials", args.trials or None),
        ("--jobs", args.jobs if args.jobs != 1 else None),
        ("--storage", args.storage),
        ("--out", out),
    ):
        argv += [flag, str(value)] if value is not None else []
    for flag, values in (("--grid", args.grid), ("--range", args.range), ("--set", args.set)):
        argv += [a for v in values or [] for a in (flag, v)]
    return shlex.join(argv)


def cmd_sweep(args: argparse.Namespace) -> int:
    """`msl-kit sweep`: a grid or TPE search over dotted keys on Optuna (msl_kit.sweep.runner)."""
    from msl_kit.sweep.runner import run_sweep
    from msl_kit.sweep.spec import SweepError, make_spec, markdown

    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise SweepError(f"--seeds must be integers like 0,1,2, got {args.seeds!r}") from None
    if args.jobs < 1:
        raise SweepError(f"--jobs must be at least 1, got {args.jobs}")
    spec = make_spec(
        args.grid or [],
        args.range or [],
        seeds,
        args.config,
        args.set or [],
        args.trials,
        args.study,
    )
    out = Path(args.out or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        result = run_sweep(spec, out, jobs=args.jobs, storage=args.storage, on_cell=_print_cell)
    except KeyboardInterrupt:  # every worker has stopped; finished cells and checkpoints are kept
        print(f"\ninterrupted; resume the sweep with: {_sweep_command(args, out)}", file=sys.stderr)
        return 130
    print("\n" + markdown(result["summary"], result["keys"]))
    for params in result["failed"]:
        print(f"failed: {params} (see the log above; rerun the command to retry)", file=sys.stderr)
    print(f"sweep folder: {out}  (sweep.csv, summary.csv, summary.md, optuna.db, runs/)")
    return 1 if result["failed"] else 0


def add_sweep_command(sub: argparse._SubParsersAction) -> None:
    """`sweep`."""
    p = sub.add_parser("sweep", help="grid or search over config keys (Optuna; resumable)")
    p.add_argument(
        "--grid", action="append", metavar="KEY=V1,V2", help="e.g. loss.ms.beta=10,40,160"
    )
    p.add_argument("--range", action="append", metavar="KEY=LO:HI[:log]", help="with --trials")
    p.add_argument("--trials", type=int, default=0, help="TPE search of N trials over --range")
    p.add_argument("--study", help="a named sweep set from configs/sweeps/, e.g. batch-size")
    p.add_argument("--seeds", help="comma-separated seeds per cell (default 0)")
    p.add_argument("--config", help="base config: preset name from configs/ or a YAML path")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every cell")
    p.add_argument("--out", help="sweep folder (default runs/sweep-<time>)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes on this machine")
    p.add_argument(
        "--storage",
        help="Optuna storage URL shared by several machines (default sqlite:///OUT/optuna.db)",
    )
    p.set_defaults(func=cmd_sweep)
