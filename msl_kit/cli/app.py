"""`msl-kit prepare | train | evaluate | bench`: a thin shell over the library."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path

# The source checkout this module runs from, if any: benchmarks live in its bench/ folder.
REPO = Path(__file__).resolve().parents[2]


def _table(rows: list[tuple[str, dict]], ks: list[int]) -> str:
    cols = [f"R@{k}" for k in ks] + ["MAP@R"]
    width = max([28, *(len(name) + 1 for name, _ in rows)])  # timm names run long
    lines = [" " * width + "".join(f"{c:>8}" for c in cols)]
    for name, m in rows:
        vals = [m.get(f"recall@{k}", float("nan")) for k in ks] + [m.get("map@r", float("nan"))]
        lines.append(f"{name:<{width}}" + "".join(f"{100 * v:>8.1f}" for v in vals))
    return "\n".join(lines)


def _counted(m: dict) -> str:
    """How a table's numbers were counted (absent in runs from before both options: ip, miss)."""
    lone = m.get("lone_queries", "miss")
    fate = "count as misses in R@K" if lone == "miss" else "are left out of R@K"
    return (
        f"ranked by {'inner product' if m.get('metric', 'ip') == 'ip' else 'Euclidean distance'}; "
        f"queries without a relevant item {fate} (eval.lone_queries={lone})"
    )


class _Progress:
    """A tqdm bar over iterations showing the loss and the latest R@1."""

    def __init__(self) -> None:
        self.bar = None
        self.last_r1: float | None = None

    def on_start(self, cfg, start: int, total: int) -> None:
        from tqdm.auto import tqdm

        if start:
            print(
                f"resuming at iteration {start} of {total} with the config stored in the run",
                file=sys.stderr,
            )
        self.bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def on_step(self, record: dict) -> None:
        self.bar.update(1)
        post = {"loss": f"{record['loss']:.4f}"}
        self.last_r1 = record.get("recall@1", self.last_r1)
        if self.last_r1 is not None:
            post["R@1"] = f"{self.last_r1:.3f}"
        self.bar.set_postfix(post, refresh=False)

    def on_eval(self, iteration: int, results: dict) -> None: ...

    def on_end(self, results: dict) -> None:
        self.close()

    def close(self) -> None:
        """End the bar's line, so that an error message after it starts on a line of its own."""
        if self.bar is not None:
            self.bar.close()


def _set_threads(cfg) -> None:
    """This process's torch threads: a core per DataLoader worker is left free, since
    oversubscribing 2 cores slowed training ~10x here. Only the CLI does this, for itself."""
    import torch

    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) - cfg.data.workers))


def _default_out(config_name: str | None) -> Path:
    stem = Path(config_name).stem if config_name else "omniglot_small"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args: argparse.Namespace) -> int:
    from msl_kit.train import engine
    from msl_kit.train.config import load_config

    if args.resume:
        if args.config:
            print(
                "error: --resume uses the config stored in the run; drop --config (only "
                f"{', '.join(engine.RESUME_KEYS)} may change, with --set)",
                file=sys.stderr,
            )
            return 2
        out, cfg = Path(args.resume), None
        if (out / "config.yaml").is_file():  # the run's threads (resume refuses an edited file)
            _set_threads(load_config(out / "config.yaml"))
    else:
        cfg = load_config(
            args.config, [*(args.set or []), *(["eval.floors=false"] if args.no_baseline else [])]
        )
        out = Path(args.out) if args.out else _default_out(args.config)
        _set_threads(cfg)
    started = time.perf_counter()
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    progress = _Progress()
    try:
        results = engine.train(
            cfg,
            out,
            callbacks=[progress] if main_rank else [],
            resume=bool(args.resume),
            overrides=args.set or [] if args.resume else [],
        )
    finally:
        progress.close()
    if main_rank:
        _report(out, results, time.perf_counter() - started)
    return 0


def _report(out: Path, results: dict, seconds: float) -> None:
    from msl_kit.train.config import load_config

    cfg = load_config(out / "config.yaml")
    floors = results.get("floors", {})
    untrained = (
        f"{cfg.model.backbone} + untrained head"
        if "backbone" in floors
        else f"untrained {cfg.model.backbone}"
    )
    rows = [
        (name, floors[key])
        for key, name in (
            ("raw_pixels", "raw pixels"),
            ("backbone", f"{cfg.model.backbone} as loaded (features)"),
            ("untrained", untrained),
        )
        if key in floors
    ]
    rows.append((f"{cfg.model.backbone} + {cfg.loss.name} loss (final)", results))
    best = results.get("best", {})
    if best.get("iteration") and best.get("iteration") != results.get("iteration"):
        rows.append((f"  best of evaluations (it {best['iteration']})", best))
    split = (
        "query/gallery"
        if results.get("split") == "test" and _query_gallery(cfg)
        else results.get("split")
    )
    print(
        f"\n{cfg.data.name} {split} split (classes unseen in training), "
        f"{results.get('iteration')} iterations in {seconds:.0f} s:"
    )
    print(_table(rows, cfg.eval.ks))
    print(_counted(results))
    print(
        f"\nrun folder: {out}  (config.yaml, history.csv, checkpoint.pt, best.pt, metrics.json, "
        "snapshots/)"
    )


def _query_gallery(cfg) -> bool:
    from msl_kit.datasets.registry import info

    return info(cfg.data.name).query_gallery


def cmd_evaluate(args: argparse.Namespace) -> int:
    from msl_kit.files.atomic import atomic_write_text
    from msl_kit.train import engine, rundir

    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("metrics_eval.json")
    rundir.check_metrics_out(out)  # before the work: never replace a checkpoint or a run's files
    results, cfg = engine.evaluate_checkpoint(
        args.checkpoint,
        split=args.split,
        device=args.device,
        metric=args.metric,
        lone_queries=args.lone_queries,
    )
    counted = {"metric": cfg.eval.metric, "lone_queries": cfg.eval.lone_queries}
    print(_table([(Path(args.checkpoint).name, results)], cfg.eval.ks))
    print(_counted(counted))
    record = {
        **results,
        **counted,
        "split": cfg.eval.split,
        "checkpoint": str(args.checkpoint),
        "written_by": "msl-kit evaluate",
    }
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"metrics written to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from msl_kit.datasets.preparation import prepare
    from msl_kit.datasets.registry import list_datasets

    if args.weights:
        from msl_kit.models.weights import download_weights

        dest = download_weights(args.weights, args.root, url=args.url)
        print(f"{args.weights} weights in {dest}; use --set model.pretrained={dest}")
        return 0
    if args.list or not args.name:
        rows = list_datasets()
        w = [max(len(getattr(d, k)) for d in rows) for k in ("name", "size", "licence")]
        for d in rows:
            print(f"{d.name:<{w[0]}}  {d.size:<{w[1]}}  {d.licence:<{w[2]}}  {d.source}")
        return 0
    archive = args.archive[0] if args.archive and len(args.archive) == 1 else args.archive
    max_bytes = None if args.max_size is None else int(args.max_size * 1e9)
    path = prepare(
        args.name,
        args.root or "data",
        archive=archive,
        url=args.url,
        max_bytes=max_bytes,
        max_members=args.max_files,
    )
    print(f"{args.name} ready in {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    bench = REPO / "bench"
    if not (bench / "loss.py").is_file():
        print(
            "error: the benchmarks come with the source checkout (bench/ beside msl_kit/), "
            "not with the installed package: git clone the project and run msl-kit bench there",
            file=sys.stderr,
        )
        return 2
    script = bench / f"{args.name}.py"
    if not script.is_file():
        names = sorted(p.stem for p in (REPO / "bench").glob("*.py"))
        print(f"error: no benchmark '{args.name}'; available: {', '.join(names)}", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _print_cell(run: dict) -> None:
    """One line per finished sweep cell (module-level: --jobs workers receive it pickled)."""
    print(
        f"{Path(run['run']).name}: R@1 {100 * run['recall@1']:.1f}  MAP@R "
        f"{100 * run['map@r']:.1f}  {run['wall_s']:.1f} s",
        flush=True,
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    """`msl-kit sweep`: a grid or TPE search over dotted keys on Optuna (msl_kit.sweep.runner)."""
    from msl_kit.sweep.runner import markdown, run_sweep
    from msl_kit.sweep.spec import SweepError, make_spec

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
    result = run_sweep(spec, out, jobs=args.jobs, storage=args.storage, on_cell=_print_cell)
    print("\n" + markdown(result["summary"], result["keys"]))
    for params in result["failed"]:
        print(f"failed: {params} (see the log above; rerun the command to retry)", file=sys.stderr)
    print(f"sweep folder: {out}  (sweep.csv, summary.csv, summary.md, optuna.db, runs/)")
    return 1 if result["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `msl-kit`."""
    parser = argparse.ArgumentParser(
        prog="msl-kit", description="Multi-Similarity loss research kit"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (default: embedded Omniglot demo on the CPU)")
    p.add_argument("--config", help="recipe name (msl_kit/configs/) or a YAML path")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. loss.beta=50 (with --resume: train.iterations, "
        "train.eval_every, train.checkpoint_every, train.log_every)",
    )
    p.add_argument("--out", help="run folder (default runs/<config>-<time>)")
    p.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its last complete checkpoint"
    )
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip every floor: raw pixels, untrained, backbone (= --set eval.floors=false)",
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="evaluate a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", choices=["test", "val"])
    p.add_argument("--device")
    p.add_argument("--metric", choices=["ip", "euclidean"], help="default: the run's eval.metric")
    p.add_argument("--lone-queries", choices=["miss", "skip"], help="skip: left out of R@K (PML)")
    p.add_argument("--out", help="where to write the metrics JSON (default beside the checkpoint)")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("prepare", help="download / verify / extract a dataset")
    p.add_argument("name", nargs="?")
    p.add_argument("--root", help="dataset folder (default data/), or where --weights go")
    p.add_argument("--archive", nargs="+", help="local archive file(s) instead of downloading")
    p.add_argument("--url", help="download from this URL instead of the official one")
    p.add_argument("--list", action="store_true", help="list the datasets")
    p.add_argument(
        "--max-size",
        type=float,
        metavar="GB",
        help="refuse archives declaring more than this many GB (default 20)",
    )
    p.add_argument(
        "--max-files",
        type=int,
        metavar="N",
        help="refuse archives of more than N members (default 500000)",
    )
    p.add_argument(
        "--weights",
        metavar="BACKBONE",
        help="download a backbone's ImageNet weights instead "
        "(into --root if given, else the default cache path)",
    )
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("bench", help="run a benchmark script from bench/")
    p.add_argument("name", help="loss, knn, data, train_step, quality")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("sweep", help="grid or search over config keys (Optuna; resumable)")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="e.g. loss.beta=10,40,160")
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
    from msl_kit.cli.use import add_use_commands  # embed, search, export

    add_use_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `msl-kit`; every anticipated failure prints one line and returns 2."""
    # Before torch is first imported: OpenMP's default spin-waiting made 2 busy cores ~10x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from msl_kit.files.atomic import CheckpointError
    from msl_kit.train.checks import ConfigError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, OSError, ValueError, TypeError) as e:
        if os.environ.get("MSL_KIT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from msl_kit.train.trainer import DivergenceError

        if os.environ.get("MSL_KIT_DEBUG") or not isinstance(e, DivergenceError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        out = getattr(e, "out", None)
        if out is not None:
            print(f"\n{e}. Continue with: msl-kit train --resume {out}", file=sys.stderr)
        else:
            print("\ninterrupted before training started; nothing to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
