"""The MS paper's comparison on real photos: six losses, one backbone, one cache, one budget.

    python bench/photos.py [--root DIR] [--methods ms ms_nomining ...] [--seeds 0 1 2]
                           [--set KEY=VALUE ...] [--threads 2] [--out docs/results.md]
                           [--results DIR] [--runs DIR] [--report-only] [--force]
                           [--stages global_pool blocks.5 blocks.3]
    msl-kit bench photos [the same arguments]

Every run is the recipe `cub200_lite0_cpu` on the team's CUB subset (EfficientNet-Lite0 with the
ImageNet weights of the pip package; blocks 0-4 frozen, their output cached once for a few seeded
views of every training image; blocks 5-6, the head conv and a 512-d embedding trained), the
same seed giving every loss the same head initialisation and the same P x K batches and views;
only the loss changes. The cache is built before the grid (timed apart) and read by every run.
Rows: the released MS loss, MS without its mining (every pair weighted), Proxy-Anchor with its
own numbers (alpha 32, margin 0.1, proxies at 100 x lr), contrastive, semi-hard triplet,
pytorch-metric-learning's MS miner + loss; then the floors: the backbone as loaded (pooled
features), the untrained head, raw pixels. One JSON per run goes to --results (a finished run
is kept on a rerun unless --force); the section `## Real photos` of --out is rebuilt from them,
the rest of that file left as it is. `--stages CUT ...` adds MS runs frozen up to other modules
(more or fewer stages trained, each cut its own cache): R@1 against how much of the network
trains, beside the recipe's cut.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP starves a shared box

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (also under runpy)
from quality import PMLMultiSimilarity  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO.parent / "shared" / "data" / "CUB_200_2011_subset100.tgz"
RECIPE = "cub200_lite0_cpu"
SECTION = "## Real photos"
METHODS = {  # key -> (row label, config overrides)
    "ms": ("MS (released 2/40/0.5/0.1)", ["loss.name=ms"]),
    "ms_nomining": ("MS without mining (every pair)", ["loss.name=ms", "loss.mining=none"]),
    "proxy_anchor": ("Proxy-Anchor (32, 0.1, proxies lr x 100)", ["loss.name=proxy_anchor"]),
    "contrastive": ("contrastive (neg margin 0.5)", ["loss.name=contrastive"]),
    "triplet": (
        "triplet, semi-hard (margin 0.1)",
        ["loss.name=triplet", "loss.triplet.margin=0.1"],
    ),
    "pml_ms": ("PML MS miner + loss (same numbers)", ["loss.name=ms"]),
}
FLOORS = {  # metrics.json floors key -> row label
    "backbone": "backbone as loaded (floor)",
    "untrained": "untrained head (floor)",
    "raw_pixels": "raw pixels (floor), pooled to 32 px",
}
KEYS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r"]


def prepare_data(root: Path) -> None:
    """Prepare the CUB subset from ../shared/data into `root` unless it is there."""
    from msl_kit import datasets

    if datasets.is_prepared("cub200", root):
        return
    if not SUBSET.is_file():
        sys.exit(f"error: {SUBSET} not found (this bench needs the team's ../shared/data)")
    datasets.prepare("cub200", root, archive=str(SUBSET), progress=False)


def make_config(args: argparse.Namespace, seed: int, extra: list[str], floors: str):
    from msl_kit.train.config import load_config

    return load_config(
        RECIPE,
        [
            f"data.root={args.root}",
            f"train.threads={args.threads}",
            "train.checkpoint_every=0",
            f"eval.floors={floors}",
            f"seed={seed}",
            *extra,
            *args.set,
        ],
    )


def build_cache(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> float:
    """Build (or find) the recipe's cached sets once; the seconds it took."""
    from msl_kit.train import recipe
    from msl_kit.train.prefix_cache.run import FrozenPrefix

    cfg = make_config(args, 0, list(extra), "false")
    device = torch.device("cpu")
    start = time.perf_counter()
    prefix = FrozenPrefix.attach(cfg, recipe.build_model(cfg), device)
    for dataset in recipe.eval_data(cfg):
        if dataset is not None:
            prefix.cached_set(dataset, 1, device)
    prefix.cached_set(recipe.train_data(cfg), cfg.cache.views, device)
    return time.perf_counter() - start


def eval_curve(run_dir: Path) -> dict[int, float]:
    """R@1 at each evaluation of a run (history.csv)."""
    with open(run_dir / "history.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("recall@1")]
    return {int(r["iteration"]): float(r["recall@1"]) for r in rows}


def run_cell(
    method: str, seed: int, args: argparse.Namespace, floors: str, cut: str | None = None
) -> dict:
    """Train one (loss, seed) run of the recipe (frozen up to `cut` if given); its record."""
    from msl_kit.train import engine, recipe

    label, overrides = METHODS[method]
    overrides = overrides + ([f"cache.prefix={cut}"] if cut else [])
    cfg = make_config(args, seed, overrides, floors)
    loss = None
    if method == "pml_ms":
        ms = recipe.ms_params(cfg)
        loss = PMLMultiSimilarity(ms.alpha, ms.beta, ms.lam, ms.margin)
    run_dir = Path(args.runs) / f"{method}-seed{seed}{f'-{cut}' if cut else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the bench's own scratch: a rerun starts afresh
    load = os.getloadavg()[0]
    start = time.perf_counter()
    results = engine.train(cfg, run_dir, loss_fn=loss)
    wall = time.perf_counter() - start
    return {
        "method": method,
        "label": label,
        "seed": seed,
        "metrics": {k: float(results[k]) for k in KEYS},
        "floors": {k: {m: float(v[m]) for m in KEYS} for k, v in results["floors"].items()},
        "curve": eval_curve(run_dir),
        "iterations": cfg.train.iterations,
        "batch_size": cfg.train.batch_size,
        "samples_per_class": cfg.train.samples_per_class,
        "lr": cfg.train.lr,
        "views": cfg.cache.views,
        "prefix": cfg.cache.prefix,
        "wall_s": wall,
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "overrides": overrides + args.set,
    }


def record_path(results: Path, method: str, seed: int, cut: str | None = None) -> Path:
    return results / (f"stages__{cut}__seed{seed}.json" if cut else f"{method}__seed{seed}.json")


def stage_table(records: list[dict], stages: list[dict]) -> list[str]:
    """MS's R@1 and MAP@R against the module the frozen prefix ends at (what trains after it)."""
    runs = stages + [r for r in records if r["method"] == "ms"]
    cuts = sorted({r["prefix"] for r in runs}, key=lambda c: (c != "global_pool", c), reverse=True)
    if len(cuts) < 2:
        return []
    lines = [
        "MS (released numbers, the recipe's budget) against how much of Lite0 trains: frozen up "
        "to the module named, everything after it trained (`global_pool`: the embedding layer "
        "alone). Each cut is its own cache; the recipe's is blocks.4.",
        "",
        "| frozen up to | seeds | R@1 | R@2 | MAP@R | wall s | cache build s |",
        "|---|---|---|---|---|---|---|",
    ]
    for cut in cuts:
        rs = [r for r in runs if r["prefix"] == cut]
        vals = [cell([r["metrics"][k] for r in rs]) for k in ("recall@1", "recall@2", "map@r")]
        wall = statistics.median(r["wall_s"] for r in rs)
        seeds = ",".join(str(r["seed"]) for r in rs)
        build = f"{rs[0]['cache_s']:.0f}" if "cache_s" in rs[0] else "above"
        lines.append(f"| {cut} | {seeds} | {' | '.join(vals)} | {wall:.0f} | {build} |")
    return lines


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(records: list[dict]) -> list[str]:
    """The results table: one row per method, then the floors."""
    lines = [
        "| method | seeds | R@1 | R@2 | R@4 | R@8 | MAP@R | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, (label, _) in METHODS.items():
        runs = [r for r in records if r["method"] == method]
        if runs:
            vals = [cell([r["metrics"][k] for r in runs]) for k in KEYS]
            seeds = ",".join(str(r["seed"]) for r in runs)
            wall = statistics.median(r["wall_s"] for r in runs)
            lines.append(f"| {label} | {seeds} | {' | '.join(vals)} | {wall:.0f} |")
    with_floors = [r for r in records if r["floors"]]
    for key, label in FLOORS.items():
        runs = [r for r in with_floors if key in r["floors"]]
        if key != "untrained":  # seed-free: one value
            runs = runs[:1]
        else:  # the head's initialisation depends on the seed alone: one record per seed
            runs = list({r["seed"]: r for r in reversed(runs)}.values())[::-1]
        if runs:
            vals = [cell([r["floors"][key][k] for r in runs]) for k in KEYS]
            seeds = ",".join(str(r["seed"]) for r in runs) if key == "untrained" else "-"
            lines.append(f"| {label} | {seeds} | {' | '.join(vals)} | - |")
    return lines


def verdicts(records: list[dict]) -> list[str]:
    """Plain sentences: MS against the backbone as loaded (R@1 and MAP@R), and against every
    other loss; a comparison with a single seed on either side gives the difference, no verdict."""
    r1 = {m: [100 * r["metrics"]["recall@1"] for r in records if r["method"] == m] for m in METHODS}
    floor = next((r["floors"]["backbone"] for r in records if "backbone" in r["floors"]), None)
    if not r1["ms"] or floor is None:
        return ["- MS or the backbone floor is missing: no verdict."]
    ms, ms_std = mean_std(r1["ms"])
    base = 100 * floor["recall@1"]
    gain = ms - base
    if len(r1["ms"]) < 2:
        head = (
            f"- MS against the backbone as loaded: R@1 {ms:.1f} vs {base:.1f}, {gain:+.1f} points "
            "from one seed: no spread yet, so no verdict until more seeds have run."
        )
    else:
        head = (
            f"- MS against the backbone as loaded: R@1 {ms:.1f} ± {ms_std:.1f} vs {base:.1f}, "
            f"{gain:+.1f} points; the seeds' spread (std) is {ms_std:.1f}, so MS "
            + (
                "**beats the frozen floor by more than the spread**."
                if gain > ms_std
                else "does **not** beat the frozen floor by more than the spread."
            )
        )
    ms_map = mean_std([100 * r["metrics"]["map@r"] for r in records if r["method"] == "ms"])[0]
    out = [
        head,
        f"- MAP@R (the whole ranking, not only the top hit): MS {ms_map:.1f} vs the floor's "
        f"{100 * floor['map@r']:.1f} ({ms_map - 100 * floor['map@r']:+.1f} points).",
    ]
    for method, values in r1.items():
        if method == "ms" or not values:
            continue
        other, std = mean_std(values)
        if min(len(values), len(r1["ms"])) < 2:
            out.append(
                f"- MS against {METHODS[method][0]}: {ms:.1f} vs {other:.1f} "
                f"({ms - other:+.1f} points; one seed on a side, no verdict)."
            )
            continue
        spread = max(ms_std, std)
        word = (
            "ahead of" if ms - other > spread else "behind" if other - ms > spread else "tied with"
        )
        out.append(
            f"- MS is **{word}** {METHODS[method][0]}: {ms:.1f} vs {other:.1f} "
            f"({ms - other:+.1f} points, spread {spread:.1f})."
        )
    return out


def curve_table(records: list[dict]) -> list[str]:
    """R@1 (mean over seeds) at each evaluation, one column per method."""
    methods = [m for m in METHODS if any(r["method"] == m and r["curve"] for r in records)]
    steps = sorted({int(i) for r in records for i in r["curve"]})
    if not methods or not steps:
        return []
    lines = ["| iteration | " + " | ".join(METHODS[m][0] for m in methods) + " |"]
    lines.append("|---" * (len(methods) + 1) + "|")
    for step in steps:
        row = []
        for m in methods:
            vals = [
                r["curve"][str(step)]
                for r in records
                if r["method"] == m and str(step) in r["curve"]
            ]
            row.append(f"{100 * statistics.fmean(vals):.1f}" if vals else "-")
        lines.append(f"| {step} | " + " | ".join(row) + " |")
    return lines


def cache_line(seconds: float) -> str:
    """How long the shared prefix cache took (found on disk when under a minute)."""
    what = "The shared prefix cache (eval images and every view of the training images)"
    if seconds < 60:
        return (
            f"{what} was found on disk, built by an earlier run ({seconds:.0f} s to open; the "
            "build's own time is in docs/benchmarks.md); not in `wall s`."
        )
    return f"{what} took {seconds:.0f} s to build, once, before the runs (not in `wall s`)."


def render(grid: dict, records: list[dict], stages: list[dict] = ()) -> str:
    """The `## Real photos` section."""
    first = records[0] if records else {}
    loads = [r["load_before"] for r in records] + [r["load_after"] for r in records]
    busy = max(loads, default=0) > grid["cores"] * 0.75
    machine = (
        f"Machine: {grid['machine']}, {grid['cores']} cores, torch {grid['torch']}, torch "
        f"threads {grid['threads']}; 1-minute load average {min(loads, default=0):.1f}-"
        f"{max(loads, default=0):.1f} during the runs"
        + (" (other work ran beside them: times are provisional, quality is not)." if busy else ".")
    )
    budget = (
        f"Budget per run: {first.get('iterations')} iterations x batch {first.get('batch_size')} "
        f"({first.get('batch_size', 0) // max(first.get('samples_per_class', 1), 1)} classes x "
        f"{first.get('samples_per_class')}), Adam lr {first.get('lr')}, {first.get('views')} "
        f"cached views per training image, frozen up to {first.get('prefix')}."
    )
    parts = [
        f"{SECTION}: CUB subset, ImageNet EfficientNet-Lite0, tail fine-tuned on cached views",
        "",
        "Produced on the CPU by (`--report-only` rebuilds this section from the JSON files in "
        f"`{grid['results']}`):",
        "",
        f"    {grid['command']}",
        "",
        machine,
        cache_line(grid["cache_s"]),
        budget,
        "R@K and MAP@R in % on the 42 test species (never seen in training), mean ± sample std "
        "over seeds; `wall s` is the median run (set-up, training, evaluations, floors).",
        "",
        *table(records),
        "",
        *verdicts(records),
        "",
        "R@1 on the test species during training (mean over seeds; the runs evaluate as the "
        "recipe says, `train.eval_every`):",
        "",
        *curve_table(records),
        "",
        *stage_table(records, list(stages)),
    ]
    return "\n".join(parts) + "\n"


def write_section(out: Path, text: str) -> None:
    """Replace the `## Real photos` section of `out` (up to the next `## ` or the end)."""
    old = out.read_text() if out.is_file() else ""
    if SECTION in old:
        head, rest = old.split(SECTION, 1)
        tail = rest.split("\n## ", 1)[1] if "\n## " in rest else ""
        new = head + text + ("\n## " + tail if tail else "")
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    out.write_text(new)


def run_stages(args: argparse.Namespace, results: Path) -> None:
    """MS at each cut of --stages (its cache built first, timed into each record)."""
    prepare_data(Path(args.root))
    for cut in args.stages:
        cache_s = build_cache(args, (f"cache.prefix={cut}",))
        for seed in args.seeds:
            path = record_path(results, "ms", seed, cut)
            if not path.is_file() or args.force:
                rec = run_cell("ms", seed, args, "false", cut)
                rec["cache_s"] = cache_s
                path.write_text(json.dumps(rec, indent=1) + "\n")
                print(f"ms cut {cut} seed {seed}: R@1 {100 * rec['metrics']['recall@1']:.1f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data", help="where the CUB subset is (or goes)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    p.add_argument("--results", default=str(REPO / "docs" / "results" / "photos"))
    p.add_argument("--runs", default=str(REPO / "runs" / "photos"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--stages", nargs="+", default=[], metavar="CUT", help="MS at other cuts")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    grid_file = results / "grid.json"
    if args.stages and not args.report_only:
        torch.set_num_threads(args.threads)
        run_stages(args, results)
    elif not args.report_only:
        torch.set_num_threads(args.threads)
        prepare_data(Path(args.root))
        command = "python bench/photos.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        grid = {
            "command": command.strip(),
            "machine": platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
            "results": str(results.relative_to(REPO) if results.is_relative_to(REPO) else results),
            "cache_s": build_cache(args),
        }
        grid_file.write_text(json.dumps(grid, indent=1) + "\n")
        for seed in args.seeds:
            order = (
                args.methods[seed % len(args.methods) :] + args.methods[: seed % len(args.methods)]
            )
            for n, method in enumerate(order):
                path = record_path(results, method, seed)
                if path.is_file() and not args.force:
                    continue
                floors = "true" if seed == args.seeds[0] and n == 0 else "[untrained, backbone]"
                rec = run_cell(method, seed, args, floors)
                path.write_text(json.dumps(rec, indent=1) + "\n")
                print(
                    f"{method} seed {seed}: R@1 {100 * rec['metrics']['recall@1']:.1f} "
                    f"in {rec['wall_s']:.0f} s",
                    flush=True,
                )
    grid = json.loads(grid_file.read_text())
    files = sorted(results.glob("*__seed*.json"))
    records = [json.loads(p.read_text()) for p in files if not p.name.startswith("stages__")]
    stages = [json.loads(p.read_text()) for p in files if p.name.startswith("stages__")]
    out = Path(args.out)
    write_section(out, render(grid, records, stages))
    print(f"written: the {SECTION!r} section of {out} (runs in {results})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
