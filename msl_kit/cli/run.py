"""`msl-kit train` and `msl-kit evaluate`: a run's progress bar, its results table, threads."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


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


def torch_threads(cfg) -> int:
    """The torch threads a CLI run uses: `train.threads`; when 0, OMP_NUM_THREADS where the
    environment sets a positive number (a cluster's scheduler or a test runner sharing the
    cores), else the cores minus one per DataLoader worker (oversubscribing 2 cores slowed
    training ~10x here)."""
    if cfg.train.threads:
        return cfg.train.threads
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, (os.cpu_count() or 1) - cfg.data.workers)


def _set_threads(cfg) -> None:
    """Set this process's torch threads (only the CLI does this, for itself)."""
    import torch

    torch.set_num_threads(torch_threads(cfg))


def _default_out(config_name: str | None) -> Path:
    stem = Path(config_name).stem if config_name else "omniglot_small"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def add_plugin_option(p: argparse.ArgumentParser) -> None:
    """`--plugin NAME` (repeatable): the only way a stored checkpoint's plugin is imported."""
    p.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE",
        help="import this module first (a checkpoint trained with a plugin's loss or backbone "
        "needs it; a checkpoint never imports code by itself)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from msl_kit.train import engine
    from msl_kit.train.config import load_config
    from msl_kit.train.rundir import RunFolder

    if args.plugin and not args.resume:
        print(
            "error: --plugin is for --resume; a new run names its plugins in its config "
            f"(--set plugins=[{args.plugin[0]}]), which also records them",
            file=sys.stderr,
        )
        return 2
    if args.resume:
        if args.config:
            print(
                "error: --resume uses the config stored in the run; drop --config (only "
                f"{', '.join(engine.RESUME_KEYS)} may change, with --set)",
                file=sys.stderr,
            )
            return 2
        out, cfg = Path(args.resume), None
        shown = RunFolder(out).config
        if shown.is_file():  # the run's threads (resume refuses an edited file)
            _set_threads(load_config(shown, stored=True))
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
    from msl_kit.train.rundir import RunFolder

    cfg = load_config(RunFolder(out).config, stored=True)
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
    r = RunFolder
    files = (r.CONFIG, r.HISTORY, r.CHECKPOINT, r.BEST, r.METRICS, f"{r.SNAPSHOTS}/")
    print(f"\nrun folder: {out}  ({', '.join(files)})")


def _query_gallery(cfg) -> bool:
    from msl_kit.datasets.registry import info

    return info(cfg.data.name).query_gallery


def cmd_evaluate(args: argparse.Namespace) -> int:
    from msl_kit.files.atomic import atomic_write_text
    from msl_kit.train import engine, rundir
    from msl_kit.train.rundir import RunFolder

    checkpoint = RunFolder.checkpoint_of(args.checkpoint)  # a file, or a run folder's
    out = Path(args.out) if args.out else checkpoint.with_name(RunFolder.EVAL_METRICS)
    rundir.check_metrics_out(out)  # before the work: never replace a checkpoint or a run's files
    results, cfg = engine.evaluate_checkpoint(
        checkpoint,
        split=args.split,
        device=args.device,
        metric=args.metric,
        lone_queries=args.lone_queries,
    )
    counted = {"metric": cfg.eval.metric, "lone_queries": cfg.eval.lone_queries}
    print(_table([(checkpoint.name, results)], cfg.eval.ks))
    print(_counted(counted))
    record = {
        **results,
        **counted,
        "split": cfg.eval.split,
        "checkpoint": str(checkpoint),
        "written_by": "msl-kit evaluate",
    }
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"metrics written to {out}")
    return 0


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    """`train` and `evaluate`."""
    p = sub.add_parser("train", help="train a model (default: embedded Omniglot demo on the CPU)")
    p.add_argument("--config", help="recipe name (msl_kit/configs/) or a YAML path")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. loss.ms.beta=50 (with --resume: train.iterations, "
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
    add_plugin_option(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="evaluate a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--split", choices=["test", "val"])
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the run's, if here)")
    p.add_argument("--metric", choices=["ip", "euclidean"], help="default: the run's eval.metric")
    p.add_argument("--lone-queries", choices=["miss", "skip"], help="skip: left out of R@K (PML)")
    p.add_argument("--out", help="where to write the metrics JSON (default beside the checkpoint)")
    add_plugin_option(p)
    p.set_defaults(func=cmd_evaluate)
