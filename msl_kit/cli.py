"""`msl-kit prepare | train | evaluate | bench`: a thin shell over the library."""
from __future__ import annotations

import os

# Must precede the first torch import: OpenMP's default spin-waiting made 2 busy cores ~10x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _table(rows: list[tuple[str, dict]], ks: list[int]) -> str:
    cols = [f"R@{k}" for k in ks] + ["MAP@R"]
    lines = [f"{'':<28}" + "".join(f"{c:>8}" for c in cols)]
    for name, m in rows:
        vals = [m.get(f"recall@{k}", float("nan")) for k in ks] + [m.get("map@r", float("nan"))]
        lines.append(f"{name:<28}" + "".join(f"{100 * v:>8.1f}" for v in vals))
    return "\n".join(lines)


class _Progress:
    """A tqdm bar over iterations showing the loss and the latest R@1."""

    def __init__(self) -> None:
        self.bar = None

    def on_start(self, cfg, start: int, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def on_step(self, record: dict) -> None:
        self.bar.update(1)
        post = {"loss": f"{record['loss']:.4f}"}
        if "recall@1" in record:
            self.last_r1 = record["recall@1"]
        if getattr(self, "last_r1", None) is not None:
            post["R@1"] = f"{self.last_r1:.3f}"
        self.bar.set_postfix(post, refresh=False)

    def on_eval(self, iteration: int, results: dict) -> None: ...

    def on_end(self, results: dict) -> None:
        self.close()

    def close(self) -> None:
        """End the bar's line, so that an error message after it starts on a line of its own."""
        if self.bar is not None:
            self.bar.close()


def _default_out(config_name: str | None) -> Path:
    stem = Path(config_name).stem if config_name else "digits"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args: argparse.Namespace) -> int:
    from msl_kit import engine, evaluation
    from msl_kit.config import load_config

    if args.resume:
        out = Path(args.resume)
        cfg = None
    else:
        cfg = load_config(args.config, args.set or [])
        out = Path(args.out) if args.out else _default_out(args.config)
        if (out / "checkpoint.pt").exists():
            print(f"error: {out} already holds a run; continue it with `msl-kit train --resume {out}` "
                  f"or choose another --out", file=sys.stderr)
            return 2
    started = time.perf_counter()
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    progress = _Progress()
    try:
        results = engine.train(cfg, out, callbacks=[progress] if main_rank else [], resume=bool(args.resume))
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    if not main_rank:
        return 0
    from msl_kit.config import from_dict
    import yaml

    cfg = from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    rows = []
    if not args.no_baseline:
        model = engine.build_model(cfg, load_pretrained=False)  # only its preprocessing spec is used
        rows.append(("raw pixels", evaluation.pixel_baseline(cfg, engine.preprocessing(cfg, model))))
    rows.append((f"{cfg.model.backbone} + {cfg.loss.name} loss", results))
    split = "query/gallery" if results.get("split") == "test" and _query_gallery(cfg) else results.get("split")
    print(f"\n{cfg.data.name} {split} split, {cfg.train.iterations} iterations in {seconds:.0f} s:")
    print(_table(rows, cfg.eval.ks))
    print(f"\nrun folder: {out}  (config.yaml, history.csv, checkpoint.pt, best.pt, metrics.json)")
    return 0


def _query_gallery(cfg) -> bool:
    from msl_kit import datasets

    return datasets.info(cfg.data.name).query_gallery


def cmd_evaluate(args: argparse.Namespace) -> int:
    from msl_kit import engine
    from msl_kit.checkpoint import atomic_write_text

    results, cfg = engine.evaluate_checkpoint(args.checkpoint, split=args.split, device=args.device)
    print(_table([(Path(args.checkpoint).name, results)], cfg.eval.ks))
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("metrics_eval.json")
    atomic_write_text(out, json.dumps({**results, "split": cfg.eval.split}, indent=2) + "\n")
    print(f"metrics written to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from msl_kit import datasets

    if args.weights:
        from msl_kit.models import download_weights

        dest = download_weights(args.weights, args.root, url=args.url)
        print(f"{args.weights} weights in {dest}; use --set model.pretrained={dest}")
        return 0
    if args.list or not args.name:
        for d in datasets.list_datasets():
            print(f"{d.name:<10} {d.size:<40} {d.licence:<36} {d.source}")
        return 0
    archive = args.archive[0] if args.archive and len(args.archive) == 1 else args.archive
    path = datasets.prepare(args.name, args.root or "data", archive=archive, url=args.url)
    print(f"{args.name} ready in {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    script = REPO / "bench" / f"{args.name}.py"
    if not script.is_file():
        names = sorted(p.stem for p in (REPO / "bench").glob("*.py"))
        print(f"error: no benchmark '{args.name}'; available: {', '.join(names)}", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _print_cell(run: dict) -> None:
    """One line per finished sweep cell (module-level: --jobs workers receive it pickled)."""
    print(f"{Path(run['run']).name}: R@1 {100 * run['recall@1']:.1f}  MAP@R "
          f"{100 * run['map@r']:.1f}  {run['wall_s']:.1f} s", flush=True)


def cmd_sweep(args: argparse.Namespace) -> int:
    """`msl-kit sweep`: a grid or TPE search over dotted keys on Optuna (msl_kit.sweep)."""
    from msl_kit import sweep

    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise sweep.SweepError(f"--seeds must be integers like 0,1,2, got {args.seeds!r}") from None
    if args.jobs < 1:
        raise sweep.SweepError(f"--jobs must be at least 1, got {args.jobs}")
    spec = sweep.make_spec(args.grid or [], args.range or [], seeds, args.config, args.set or [],
                           args.trials, args.study)
    out = Path(args.out or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    result = sweep.run_sweep(spec, out, jobs=args.jobs, storage=args.storage, on_cell=_print_cell)
    print("\n" + sweep.markdown(result["summary"], result["keys"]))
    for params in result["failed"]:
        print(f"failed: {params} (see the log above; rerun the command to retry)", file=sys.stderr)
    print(f"sweep folder: {out}  (sweep.csv, summary.csv, summary.md, optuna.db, runs/)")
    return 1 if result["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `msl-kit`."""
    parser = argparse.ArgumentParser(prog="msl-kit", description="Multi-Similarity loss research kit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (default: embedded digits demo on the CPU)")
    p.add_argument("--config", help="preset name from configs/ or a YAML path")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. loss.beta=50")
    p.add_argument("--out", help="run folder (default runs/<config>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last complete checkpoint")
    p.add_argument("--no-baseline", action="store_true", help="skip the raw-pixel baseline row")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="evaluate a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", choices=["test", "val"])
    p.add_argument("--device")
    p.add_argument("--out", help="where to write the metrics JSON (default beside the checkpoint)")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("prepare", help="download / verify / extract a dataset")
    p.add_argument("name", nargs="?")
    p.add_argument("--root", help="dataset folder (default data/), or where --weights go")
    p.add_argument("--archive", nargs="+", help="local archive file(s) instead of downloading")
    p.add_argument("--url", help="download from this URL instead of the official one")
    p.add_argument("--list", action="store_true", help="list the datasets")
    p.add_argument("--weights", metavar="BACKBONE", help="download a backbone's ImageNet weights instead "
                   "(into --root if given, else the default cache path)")
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
    p.add_argument("--storage", help="Optuna storage URL shared by several machines "
                   "(default sqlite:///OUT/optuna.db)")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `msl-kit` command; errors print one clear line instead of a traceback."""
    args = build_parser().parse_args(argv)
    from msl_kit.checkpoint import CheckpointError
    from msl_kit.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, OSError, ValueError, TypeError) as e:
        if os.environ.get("MSL_KIT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from msl_kit.engine import DivergenceError  # imported only here: `prepare` need not load the engine

        if os.environ.get("MSL_KIT_DEBUG") or not isinstance(e, DivergenceError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; resume with `msl-kit train --resume DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
