"""Retrieval quality on real data: msl_kit's MS loss against PML's, other losses and two floors.

    python bench/quality.py [--datasets omniglot cub] [--methods ms pml_ms ...] [--seeds 0 1 2]
                            [--iters omniglot=80 cub=50] [--root data] [--threads 2] [--workers 0]
                            [--quick] [--report-only] [--force]
    msl-kit bench quality [the same arguments]

Every cell trains the small convnet of the dataset's preset (configs/omniglot_convnet.yaml,
configs/cub_subset_convnet.yaml) on the CPU with the same budget, model and seed; only the loss
changes. Same seed = same initial weights and the same P x K batches for every loss. Cells run
dataset by dataset, seed by seed, with ours and PML's MS adjacent (which goes first alternates
with the seed) so machine noise hits both.
One JSON per run goes to --results (a finished cell is skipped on a rerun unless --force), and
the markdown (--out, default docs/results.md) is rebuilt from those files (`--report-only`).
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # spinning OpenMP threads starve a busy 2-core box

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from msl_kit.losses import PRESETS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = {  # key -> (registry name, preset, archives under ../shared/data)
    "omniglot": (
        "omniglot",
        "omniglot_convnet",
        ["omniglot/images_background_small1.zip", "omniglot/images_background_small2.zip"],
    ),
    "cub": ("cub200", "cub_subset_convnet", ["CUB_200_2011_subset100.tgz"]),
}
RELEASED = dict(PRESETS["released"])
ABLATIONS = "## Ablations"  # docs/results.md keeps this section (msl-kit sweep) on a rebuild
PAPER = dict(PRESETS["paper"])


class PMLMultiSimilarity(nn.Module):
    """pytorch-metric-learning's MultiSimilarityMiner + MultiSimilarityLoss, as a user plugs them
    in."""

    def __init__(self, alpha: float, beta: float, lam: float, margin: float) -> None:
        super().__init__()
        from pytorch_metric_learning import losses, miners

        self.miner = miners.MultiSimilarityMiner(epsilon=margin)
        self.loss = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=lam)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


class _BackwardEnd(torch.autograd.Function):
    """Identity whose backward stamps the end of the wrapped loss's backward pass."""

    @staticmethod
    def forward(ctx, embeddings: torch.Tensor, timer: TimedLoss) -> torch.Tensor:  # type: ignore[override]
        ctx.timer = timer
        return embeddings.view_as(embeddings)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.timer.stop_backward()
        return grad, None


class TimedLoss(nn.Module):
    """Wraps a loss and adds up the seconds of its forward and backward (exact on the CPU, which
    runs synchronously): the backward clock starts when the loss's output receives its gradient
    and stops when the gradient reaches the embeddings."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss, self.seconds, self.calls, self._bw_start = loss, 0.0, 0, None

    def stop_backward(self) -> None:
        if self._bw_start is not None:
            self.seconds += time.perf_counter() - self._bw_start
            self._bw_start = None

    def _start_backward(self, grad: torch.Tensor) -> None:
        self._bw_start = time.perf_counter()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        value = self.loss(
            _BackwardEnd.apply(embeddings, self) if embeddings.requires_grad else embeddings, labels
        )
        self.seconds += time.perf_counter() - start
        self.calls += 1
        if value.requires_grad:
            value.register_hook(self._start_backward)
        return value


def _ms(params: dict) -> Callable[[], nn.Module]:
    from msl_kit.losses import MultiSimilarityLoss

    return lambda: MultiSimilarityLoss(**params)


def _gpw(name: str, **params: object) -> Callable[[], nn.Module]:
    from msl_kit.losses import build_loss

    return lambda: build_loss(name, **params)


def methods(iterations: int) -> dict[str, tuple[str, list[str], Callable[[], nn.Module]]]:
    """key -> (row label, config overrides recorded in the run's config.yaml, loss factory).

    The loss is always passed to engine.train explicitly (timed, and engine.build_loss cannot build
    contrastive: it passes `margin=`); the overrides make config.yaml say what ran and switch XBM
    on. XBM: 20 batches of memory, on from 40 % of the run, since embeddings drift fast in a short
    run from scratch.
    """
    ms_keys = [f"loss.ms.{k}={v}" for k, v in RELEASED.items()]
    return {
        "ms": ("msl_kit MS (released 2/40/0.5/0.1)", ["loss.name=ms", *ms_keys], _ms(RELEASED)),
        "pml_ms": (
            "PML MS miner + loss (same)",
            ["loss.name=ms", *ms_keys],
            lambda: PMLMultiSimilarity(**RELEASED),
        ),
        "ms_paper": (
            "msl_kit MS (paper 2/50/1/0.1)",
            ["loss.name=ms", "loss.ms.preset=paper"],
            _ms(PAPER),
        ),
        "contrastive": (
            "contrastive (neg margin 0.5)",
            ["loss.name=contrastive"],
            _gpw("contrastive", pos_margin=0.0, neg_margin=0.5),
        ),
        "triplet": (
            "triplet, semi-hard (margin 0.1)",
            ["loss.name=triplet", "loss.triplet.margin=0.1"],
            _gpw("triplet", margin=0.1, mining="semihard"),
        ),
        "ms_xbm": (
            "msl_kit MS + XBM",
            [
                "loss.name=ms",
                *ms_keys,
                "loss.xbm_size=1600",
                f"loss.xbm_start={int(0.4 * iterations)}",
            ],
            _ms(RELEASED),
        ),
    }


METHOD_ORDER = ["ms", "pml_ms", "ms_paper", "contrastive", "triplet", "ms_xbm"]


def prepare_data(key: str, root: Path) -> None:
    """Prepare a dataset from ../shared/data into `root` unless it is already there."""
    from msl_kit import datasets

    name, _, archives = DATASETS[key]
    if datasets.is_prepared(name, root):
        return
    paths = [SHARED / a for a in archives]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found: this bench needs the team's ../shared/data "
            f"(or prepare {name} into --root yourself with `msl-kit prepare`)"
        )
    datasets.prepare(
        name,
        root,
        archive=[str(p) for p in paths] if len(paths) > 1 else str(paths[0]),
        progress=False,
    )


def make_config(key: str, args: argparse.Namespace, seed: int, extra: list[str]):
    from msl_kit.train.config import load_config

    _, preset, _ = DATASETS[key]
    return load_config(
        preset,
        [
            f"data.root={args.root}",
            f"data.workers={args.workers}",
            f"train.threads={args.threads}",
            f"train.iterations={args.iters[key]}",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "device=cpu",
            "eval.floors=false",
            "train.keep_snapshots=false",
            f"seed={seed}",
            *extra,
        ],
    )


class _StepClock:
    """Sums the engine's per-step durations (data + forward + backward + update, no evaluation)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.seconds, self.images = batch_size, 0.0, 0

    def on_start(self, *a) -> None: ...
    def on_eval(self, *a) -> None: ...
    def on_end(self, *a) -> None: ...

    def on_step(self, record: dict) -> None:
        self.seconds += self.batch_size / record["images_per_s"]
        self.images += self.batch_size


def _metrics(results: dict) -> dict:
    return {
        k: float(v)
        for k, v in results.items()
        if k.startswith("recall@") or k in ("map@r", "r_precision")
    }


def run_cell(key: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one (dataset, loss, seed) cell and return its record."""
    from msl_kit.train import engine

    label, overrides, factory = methods(args.iters[key])[method]
    cfg = make_config(key, args, seed, overrides)
    torch.manual_seed(
        seed
    )  # losses hold no parameters; keep any construction RNG use identical anyway
    loss = TimedLoss(factory())
    clock = _StepClock(cfg.train.batch_size)
    start = time.perf_counter()
    run_dir = Path(args.runs) / key / f"{method}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the bench's own scratch: a rerun starts afresh
    results = engine.train(cfg, run_dir, callbacks=[clock], loss_fn=loss)
    wall = time.perf_counter() - start
    return {
        "dataset": key,
        "method": method,
        "label": label,
        "seed": seed,
        "metrics": _metrics(results),
        "iterations": cfg.train.iterations,
        "batch_size": cfg.train.batch_size,
        "samples_per_class": cfg.train.samples_per_class,
        "lr": cfg.train.lr,
        "image_size": cfg.model.params.input_size,
        "embedding_dim": cfg.model.embedding_dim,
        "wall_s": wall,
        "train_s": clock.seconds,
        "images_per_s": clock.images / max(clock.seconds, 1e-9),
        "loss_s": loss.seconds,
        "overrides": overrides,
    }


def run_floors(key: str, seeds: list[int], args: argparse.Namespace) -> list[dict]:
    """Raw pixels (seed-free) and the untrained network (per seed) on the same test set."""
    from msl_kit.train import evaluation, recipe

    out = []
    for seed in seeds:
        cfg = make_config(key, args, seed, [])
        recipe.seed_everything(seed)
        model = recipe.build_model(cfg)
        sets = recipe.eval_data(cfg)
        opts = recipe.eval_options(cfg)
        start = time.perf_counter()
        results = evaluation.evaluate(model, *sets, torch.device("cpu"), cfg.eval.ks, opts)
        out.append(
            {
                "dataset": key,
                "method": "random",
                "label": "untrained convnet (floor)",
                "seed": seed,
                "iterations": 0,
                "metrics": _metrics(results),
                "wall_s": time.perf_counter() - start,
            }
        )
        if seed == seeds[0]:
            start = time.perf_counter()
            results = evaluation.pixel_baseline(*sets, cfg.eval.ks, opts)
            train = recipe.dataset(cfg, "train")
            sizes = {
                "train_images": len(train),
                "train_classes": len(set(train.labels.tolist())),
                "test_images": len(sets[0]),
                "test_classes": len(set(sets[0].labels.tolist())),
            }
            out.append(
                {
                    "dataset": key,
                    "method": "pixels",
                    "label": "raw pixels (floor)",
                    "seed": None,
                    "iterations": 0,
                    "metrics": _metrics(results),
                    "wall_s": time.perf_counter() - start,
                    "sizes": sizes,
                    "pixel_side": min(cfg.model.params.input_size, evaluation.PIXEL_SIDE),
                }
            )
    return out


def record_path(results_dir: Path, key: str, method: str, seed: int | None) -> Path:
    """Where the JSON of one run lives."""
    return results_dir / f"{key}__{method}__{'all' if seed is None else f'seed{seed}'}.json"


def _done(results_dir: Path, key: str, method: str, seed: int | None, iterations: int) -> bool:
    path = record_path(results_dir, key, method, seed)  # a cell run at another budget is redone
    return path.is_file() and json.loads(path.read_text()).get("iterations") in (iterations, 0)


def _save(rec: dict, results_dir: Path, command: str) -> None:
    rec = {
        **rec,
        "command": command,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0],
    }
    record_path(results_dir, rec["dataset"], rec["method"], rec["seed"]).write_text(
        json.dumps(rec, indent=1) + "\n"
    )


def load_records(results_dir: Path) -> list[dict]:
    """Every per-run JSON in `results_dir` (grid.json excluded)."""
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*__*.json"))]


# ----------------------------------------------------------------------------- report
COLUMNS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r"]
NAMES = {
    "omniglot": "Omniglot, 28 px, split by alphabet",
    "cub": "CUB-200-2011 subset, 64 px, classes 1-100 / 101-200",
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float]) -> str:
    mean, std = _mean_std([100 * v for v in values])
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def _verdict(key: str, runs: dict[str, list[dict]]) -> str:
    """One plain sentence: did ours match PML within the seeds' spread, and how much faster."""
    ours, pml = runs.get("ms", []), runs.get("pml_ms", [])
    if not ours or not pml:
        return f"{NAMES[key]}: ours vs PML not available (a cell is missing)."
    r1 = {
        n: [r["metrics"]["recall@1"] * 100 for r in rs] for n, rs in (("ours", ours), ("pml", pml))
    }
    (m_o, s_o), (m_p, s_p) = _mean_std(r1["ours"]), _mean_std(r1["pml"])
    paired = {r["seed"]: r["metrics"]["recall@1"] * 100 for r in ours}
    diffs = [paired[r["seed"]] - r["metrics"]["recall@1"] * 100 for r in pml if r["seed"] in paired]
    spread = max(s_o, s_p)
    matched = abs(m_o - m_p) <= spread if len(r1["ours"]) > 1 else None
    word = {
        True: "**matched** PML within the seeds' spread",
        False: "did **not** match PML within the seeds' spread",
        None: "cannot be judged against the seeds' spread (one seed)",
    }[matched]
    # medians: one run hit by a burst of other work on the shared box would swing a mean
    t = {n: statistics.median(r["train_s"] for r in rs) for n, rs in (("ours", ours), ("pml", pml))}
    loss = {
        n: statistics.median(r["loss_s"] / r["iterations"] * 1e3 for r in rs)
        for n, rs in (("ours", ours), ("pml", pml))
    }
    loss_alone = _faster(
        "the loss alone (forward + backward)", loss["ours"], loss["pml"], "ms per iteration"
    )
    return (
        f"{NAMES[key]}: ours {word}: R@1 {m_o:.1f} ± {s_o:.1f} vs {m_p:.1f} ± {s_p:.1f} "
        f"(mean difference {m_o - m_p:+.1f} points; "
        f"per seed {', '.join(f'{d:+.1f}' for d in diffs)}; "
        f"spread = the larger std, {spread:.1f}). "
        f"{_faster('Training steps', t['ours'], t['pml'], 's per run')}, "
        f"the convnet's forward and backward dominating both; "
        f"{loss_alone}."
    )


def _faster(what: str, ours: float, pml: float, unit: str) -> str:
    ratio = pml / ours
    how = f"ours {ratio:.2f}x faster" if ratio >= 1 else f"ours {1 / ratio:.2f}x slower"
    digits = 0 if unit.startswith("s") else 2
    return f"{what} took {ours:.{digits}f} vs {pml:.{digits}f} {unit}, medians over seeds ({how})"


ROW_NOTES = [
    "- msl_kit MS: `msl_kit.losses.MultiSimilarityLoss(alpha, beta, lam, margin)`, "
    "the released (2, 40, 0.5, 0.1) or the paper's (2, 50, 1, 0.1) numbers.",
    "- PML MS: pytorch-metric-learning's `MultiSimilarityMiner(epsilon=0.1)` then "
    "`MultiSimilarityLoss(alpha=2, beta=40, base=0.5)`, wrapped in an `nn.Module` and passed to "
    "`msl_kit.train.engine.train(..., loss_fn=...)`.",
    "- contrastive: `ContrastiveLoss(pos_margin=0, neg_margin=0.5)` on cosine similarities, "
    "summed over pairs / B.",
    '- triplet: `TripletLoss(margin=0.1, mining="semihard")`, '
    "mean over the active semi-hard triplets of the batch.",
    "- MS + XBM: the released MS loss plus the same loss of each anchor against a cross-batch "
    "memory of 1,600 detached embeddings (20 batches), switched on at 40 % of the run "
    "(embeddings drift fast from scratch), weight 1.",
    "- untrained convnet: the same network at its seed's initialisation, "
    "evaluated like the trained ones.",
    "- raw pixels: the evaluation images after the eval transform, average-pooled to at most "
    "32 px, flattened, L2-normalised (`msl_kit.train.evaluation.pixel_baseline`).",
    "- Retrieval: every test image queries all the others (itself excluded), "
    "ranked by inner product.",
]


def render(
    invocations: list[dict], records: list[dict], results_dir: str = "docs/results/quality"
) -> str:
    """The markdown report: one table per dataset, floors, the verdict, budgets, missing cells."""
    labels = {m: lab for m, (lab, _, _) in methods(0).items()}
    by = {}
    for r in records:
        by.setdefault(r["dataset"], {}).setdefault(r["method"], []).append(r)
    lines = [
        "# Retrieval quality on real data: MS loss against PML and other losses",
        "",
        f"Produced on the CPU by (each run's JSON is in `{results_dir}/`; "
        "`python bench/quality.py --report-only` with the same --out rebuilds this page from "
        "them):",
        "",
    ]
    lines += [f"    {c}" for c in sorted({r["command"] for r in records})] + [""]
    machine = invocations[-1]["machine"] if invocations else "?"
    lines += [
        f"Machine: {machine}; torch threads {invocations[-1]['threads'] if invocations else '?'}, "
        f"DataLoader workers {invocations[-1]['workers'] if invocations else '?'}. "
        "Figures are provisional: the machine was shared with other work while this ran, "
        "so times are noisy (quality is not).",
        "Same seed = same initial weights and the same P x K batches for every loss; "
        "only the loss differs. Numbers are R@K and MAP@R in % on the test classes "
        "(never seen in training), mean ± sample std over seeds. Times are medians over seeds: "
        "`wall s` is the whole run (data set-up, training, final evaluation); `img/s` counts "
        "training steps only; `loss ms/it` is the loss's forward + backward per iteration "
        "(for XBM the batch term only).",
        "",
    ]
    verdicts = []
    for key in [k for k in DATASETS if k in by]:
        runs = by[key]
        floor = (runs.get("pixels") or [{}])[0]
        sizes = floor.get("sizes", {})
        trained = [r for m in METHOD_ORDER for r in runs.get(m, [])]
        lines += [f"## {NAMES[key]}", ""]
        if sizes:
            lines.append(
                f"Train {sizes['train_images']} images of {sizes['train_classes']} classes; "
                f"test {sizes['test_images']} images of {sizes['test_classes']} unseen classes."
            )
        if trained:
            r = trained[0]
            lines.append(
                f"Budget per run: {r['iterations']} iterations x batch {r['batch_size']} "
                f"({r['batch_size'] // r['samples_per_class']} classes x "
                f"{r['samples_per_class']}) = "
                f"{r['iterations'] * r['batch_size']} images, Adam lr {r['lr']:g}, small convnet, "
                f"{r['image_size']} px, {r['embedding_dim']}-d embedding, "
                "evaluated once at the end."
            )
            budgets = sorted({t["iterations"] for t in trained})
            if len(budgets) > 1:
                lines.append(
                    "**Warning: cells of this table ran at different budgets "
                    f"({budgets} iterations); rerun with --force for a fair comparison.**"
                )
        lines += [
            "",
            "| method | seeds | R@1 | R@2 | R@4 | R@8 | MAP@R | wall s | img/s | loss ms/it |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in [*METHOD_ORDER, "random", "pixels"]:
            rs = runs.get(m, [])
            if not rs:
                continue
            seeds = ",".join(str(r["seed"]) for r in rs) if rs[0]["seed"] is not None else "-"
            vals = [_cell([r["metrics"][c] for r in rs]) for c in COLUMNS]
            train = m not in ("random", "pixels")
            extra = (
                [
                    f"{statistics.median(r['wall_s'] for r in rs):.0f}",
                    f"{statistics.median(r['images_per_s'] for r in rs):.0f}",
                    f"{statistics.median(r['loss_s'] / r['iterations'] * 1e3 for r in rs):.2f}",
                ]
                if train
                else ["-", "-", "-"]
            )
            label = labels.get(m) or rs[0]["label"]
            if m == "ms_xbm":
                xbm = dict(o.split("=", 1) for o in rs[0]["overrides"])
                label += f" (memory {xbm['loss.xbm_size']}, from iteration {xbm['loss.xbm_start']})"
            if m == "pixels":
                label += f", pooled to {floor.get('pixel_side', '?')} px"
            lines.append(f"| {label} | {seeds} | " + " | ".join(vals + extra) + " |")
        lines.append("")
        verdicts.append(_verdict(key, runs))
    lines += [
        "## What each row is",
        "",
        *ROW_NOTES,
        "",
        "## msl_kit's MS loss against pytorch-metric-learning's",
        "",
    ]
    lines += [f"- {v}" for v in verdicts] or ["- no results yet"]
    lines += [
        "",
        "Matched means |mean R@1 difference| <= the larger of the two seed std devs. "
        "The speed-up of a whole run is small because the convnet's forward and backward "
        "dominate a step; the loss-only figure isolates the part that differs.",
        "",
    ]
    missing = []
    for inv in invocations:
        plan = (
            inv["methods"]
            if isinstance(inv["methods"], dict)
            else dict.fromkeys(inv["datasets"], inv["methods"])
        )
        for key, planned in plan.items():
            for m in planned:
                have = {r["seed"] for r in by.get(key, {}).get(m, [])}
                missing += [f"{key} / {m} / seed {s}" for s in inv["seeds"] if s not in have]
    missing = sorted(set(missing))
    lines += [
        "## Missing cells",
        "",
        *([f"- {c}" for c in missing] or ["None: every planned cell finished."]),
        "",
    ]
    total = sum(r["wall_s"] for r in records)  # the runs shown, however many invocations made them
    lines += [
        f"Wall time of the grid: {total / 60:.1f} min (the sum over the runs and floors above; "
        "data preparation not included).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--methods", nargs="+", choices=METHOD_ORDER, default=METHOD_ORDER)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--iters",
        nargs="+",
        default=[],
        metavar="DATASET=N",
        help="iterations per run, e.g. cub=200",
    )
    p.add_argument(
        "--root", default="data", help="where datasets are prepared (a cache; default data/)"
    )
    p.add_argument(
        "--out", help="markdown file (default docs/results.md; --quick: a new temp folder)"
    )
    p.add_argument(
        "--results", help="folder of per-run JSON (default results/quality beside --out)"
    )
    p.add_argument("--runs", help="run folders with checkpoints (default runs/quality)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader workers; 0 and 1 gave the same img/s here within noise",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke size: 1 seed, Omniglot ms/pml_ms/triplet x 40 it, CUB ms x 5 it, temp output",
    )
    p.add_argument(
        "--report-only", action="store_true", help="rebuild the markdown from the saved JSON"
    )
    p.add_argument("--force", action="store_true", help="rerun cells that already have a JSON")
    args = p.parse_args(argv)
    iters = {"omniglot": 80, "cub": 50}  # fits ~45 min for the full grid on the shared 2-core box
    args.plan = {key: list(args.methods) for key in args.datasets}
    if args.quick:  # Omniglot long enough for MS to clear both floors; CUB only proves its path
        iters = {"omniglot": 40, "cub": 5}
        args.seeds = args.seeds[:1]
        if args.methods == METHOD_ORDER:
            args.plan = {"omniglot": ["ms", "pml_ms", "triplet"], "cub": ["ms"]}
            args.plan = {key: args.plan[key] for key in args.datasets}
        args.out = args.out or str(Path(tempfile.mkdtemp(prefix="msl_quality_")) / "results.md")
    for item in args.iters:
        key, _, n = item.partition("=")
        if key not in DATASETS or not n.isdigit() or int(n) < 1:
            p.error(
                f"--iters takes DATASET=N with DATASET in {list(DATASETS)} and N >= 1, got {item!r}"
            )
        iters[key] = int(n)
    args.iters = iters
    args.out = Path(args.out or REPO / "docs" / "results.md")
    args.results = Path(args.results or args.out.parent / "results" / "quality")
    args.runs = Path(
        args.runs or (args.out.parent / "runs" if args.quick else REPO / "runs" / "quality")
    )
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the grid (skipping cells already done at this budget), then write the markdown report."""
    args = parse_args(argv)
    command = shlex.join(["python", "bench/quality.py", *(sys.argv[1:] if argv is None else argv)])
    grid_file = args.results / "grid.json"
    invocations = json.loads(grid_file.read_text()) if grid_file.is_file() else []
    if args.report_only and not invocations:
        print(
            f"error: {grid_file} not found; run the grid first (without --report-only)",
            file=sys.stderr,
        )
        return 2
    if not args.report_only:
        args.results.mkdir(parents=True, exist_ok=True)
        inv = {
            "datasets": args.datasets,
            "methods": args.plan,
            "seeds": args.seeds,
            "iterations": args.iters,
            "threads": args.threads,
            "workers": args.workers,
            "command": command,
            "total_wall_s": 0.0,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        }
        invocations.append(inv)
        torch.set_num_threads(args.threads)
        started = time.perf_counter()
        for key in args.datasets:
            prepare_data(key, Path(args.root))
            floors = [("pixels", None)] + [("random", seed) for seed in args.seeds]
            if args.force or not all(_done(args.results, key, m, seed, 0) for m, seed in floors):
                for rec in run_floors(key, args.seeds, args):
                    _save(rec, args.results, command)
            for seed in args.seeds:
                order = list(args.plan[key])
                if seed % 2 and {"ms", "pml_ms"} <= set(
                    order
                ):  # alternate which of the pair runs first
                    i, j = order.index("ms"), order.index("pml_ms")
                    order[i], order[j] = order[j], order[i]
                for method in order:
                    if not args.force and _done(args.results, key, method, seed, args.iters[key]):
                        continue
                    rec = run_cell(key, method, seed, args)
                    _save(rec, args.results, command)
                    m = rec["metrics"]
                    print(
                        f"[{time.perf_counter() - started:6.0f} s] {key:<8} {method:<11} "
                        f"seed {seed}: R@1 "
                        f"{m['recall@1']:.3f} MAP@R {m['map@r']:.3f}  {rec['wall_s']:.0f} s, "
                        f"{rec['images_per_s']:.0f} img/s, loss {rec['loss_s']:.2f} s",
                        flush=True,
                    )
                    inv["total_wall_s"] = time.perf_counter() - started
                    grid_file.write_text(
                        json.dumps(invocations, indent=1) + "\n"
                    )  # a killed run still reports
        inv["total_wall_s"] = time.perf_counter() - started
        grid_file.write_text(json.dumps(invocations, indent=1) + "\n")
    shown = args.results.resolve()
    shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown
    text = render(invocations, load_records(args.results), str(shown))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = ""  # sections written by hand after the report (the sweep ablations) survive a rebuild
    if args.out.is_file() and ABLATIONS in args.out.read_text():
        kept = "\n" + ABLATIONS + args.out.read_text().split(ABLATIONS, 1)[1]
    args.out.write_text(text.rstrip("\n") + "\n" + kept)
    print(text)
    print(f"written: {args.out} (raw results in {args.results})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
