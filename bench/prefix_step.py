"""A cached tail step against the full step: what `cache.views` buys a CPU run.

    python bench/prefix_step.py [--root DIR] [--config cub200_lite0_cpu] [--steps 5]
                                [--threads 2] [--set key=value ...] [--quick]
    msl-kit bench prefix_step [the same arguments]

Three trainers of the same recipe and seed, each iteration timed as `msl-kit train` runs it:
the loader's next batch (JPEG decoding and augmentation for images, a gather for the cache)
plus `Trainer.step` (forward, loss, backward, update):

- full:   the whole network trains on decoded images (`cache.prefix=""`);
- frozen: the prefix frozen but run every step on decoded images (`cache.views=0`);
- cached: the tail on cached activations (`cache.views=1`: view 0 of the recipe's cache, built
          first where missing; the build is timed apart and shared with the recipe's runs).

Steps are interleaved (full, frozen, cached, full, ...) so machine noise hits all three; one
warm-up step each, then the medians over --steps and the ratios full / cached and frozen /
cached. The real data is the team's CUB subset (../shared/data, prepared into --root);
--quick trains on a few random images in a temporary folder (the tests run that).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP starves a shared box

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO.parent / "shared" / "data" / "CUB_200_2011_subset100.tgz"
KINDS = {  # name -> the overrides that make it
    "full": ["cache.prefix=", "cache.views=0"],
    "frozen": ["cache.views=0"],
    "cached": ["cache.views=1"],
}


def random_folder(root: Path) -> Path:
    """A `folder` dataset of random 64 px JPEGs: train/ 3 classes x 4, test/ 2 classes x 3."""
    rng = np.random.default_rng(0)
    for split, classes, per in (("train", 3, 4), ("test", 2, 3)):
        for c in range(classes):
            folder = root / split / f"{split}{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per):
                pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.jpg")
    return root


def data_overrides(args: argparse.Namespace, scratch: Path) -> list[str]:
    """The data keys: the real subset (prepared into --root once), or --quick's random folder."""
    if args.quick:
        folder = random_folder(scratch / "images")
        return [
            "data.name=folder",
            f"data.root={folder}",
            "model.timm.input_size=64",
            "model.pretrained=none",
            "train.batch_size=4",
            "train.samples_per_class=2",
            "eval.ks=[1]",
            f"cache.dir={scratch / 'cache'}",
        ]
    from msl_kit import datasets

    if not datasets.is_prepared("cub200", args.root):
        if not SUBSET.is_file():
            sys.exit(f"error: {SUBSET} not found (this bench needs ../shared/data, or --quick)")
        datasets.prepare("cub200", args.root, archive=str(SUBSET), progress=False)
    return [f"data.root={args.root}"]


def build(args: argparse.Namespace, kind: str, scratch: Path, data: list[str]):
    """A Trainer of the recipe with `kind`'s overrides, writing into a scratch folder."""
    from msl_kit.train import distributed
    from msl_kit.train.config import load_config
    from msl_kit.train.trainer import Trainer

    cfg = load_config(
        args.config,
        [
            *data,
            f"train.iterations={args.steps + 1}",
            "eval.floors=false",
            "train.keep_snapshots=false",
            "data.workers=0",
            *KINDS[kind],
            *args.set,
        ],
    )
    out = scratch / kind
    out.mkdir()
    return Trainer(cfg, out, distributed.init_distributed())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data", help="where the CUB subset is (or goes)")
    parser.add_argument("--config", default="cub200_lite0_cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="random images, 64 px, tiny batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = data_overrides(args, scratch)
        runs, build_s = {}, {}
        for kind in KINDS:
            start = time.perf_counter()
            runs[kind] = build(args, kind, scratch, data)  # the cached one builds its cache
            build_s[kind] = time.perf_counter() - start
        iters = {kind: iter(run.loader) for kind, run in runs.items()}
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for step in range(args.steps + 1):
            for kind, run in runs.items():
                begin = time.perf_counter()
                run.step(*next(iters[kind]))
                if step:  # the first step of each warms up
                    times[kind].append(time.perf_counter() - begin)
    cfg = runs["cached"].cfg
    print(
        f"{cfg.model.backbone}, batch {cfg.train.batch_size} at "
        f"{runs['cached'].model.preprocessing.input_size} px, prefix up to {cfg.cache.prefix}; "
        f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}, "
        f"median of {args.steps} steps"
    )
    med = {kind: statistics.median(t) for kind, t in times.items()}
    for kind in KINDS:
        print(f"{kind:>7} step: {med[kind]:.3f} s (batch + forward + backward + update)")
    print(f"full / cached: {med['full'] / med['cached']:.1f}x")
    print(f"frozen / cached: {med['frozen'] / med['cached']:.1f}x")
    extra = build_s["cached"] - build_s["frozen"]
    print(f"set-up of the cached trainer, cache built where missing: +{extra:.1f} s")


if __name__ == "__main__":
    main()
