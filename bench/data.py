"""Training-pipeline throughput on the CUB subset, and what the fused crop changes.

    python bench/data.py [--root DIR] [--archive ../shared/data/CUB_200_2011_subset100.tgz]
                         [--workers 2] [--batch-size 80] [--batches 40] [--rounds 3]
                         [--spec bninception|resnet] [--threads 1] [--seeds 20]

Three pipelines read the same CUB training images (classes 1-100) in a seeded shuffled order
through a DataLoader with the same worker count, batch size and train transform (BN-Inception:
Resize 256 -> RandomResizedCrop 227 scale (0.16, 1) -> flip -> BGR 0-255 minus mean; ResNet:
RGB, ImageNet mean/std, 224): a plain torchvision ImageFolder + transforms, and
msl_kit's datasets.build + build_transform with `crop="two_step"` (the recipes' default) and
with `crop="fused"`. The dataset is prepared into a temporary folder from --archive unless
--root holds it already. Each round times each pipeline from its first batch (workers started)
to its last, pipelines interleaved with the order rotating by round; images/s is the median.
Beside it, the CPU time one process spends to read and transform an image (process_time,
single thread, median of 3 rounds of 300 images), which shared cores disturb far less.

Before timing, a check: (1) the eval tensors of msl_kit and torchvision; (2) the train crops of
both crop modes against torchvision's two-step output, same torch seed, on real photos: the
subset's 227-px images and the same images rescaled to 500x375 and 640x427 (so that Resize 256
shrinks them, as it does full-size CUB photos). Reported: mean |difference| per draw as a
fraction of the pixel range (median and worst), and the fused crop's gradient energy
(mean squared finite difference) relative to the two-step crop's.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import datasets as tvd
from torchvision import transforms as tv

from msl_kit import datasets
from msl_kit.datasets.transforms import build_transform, load_image
from msl_kit.models import preprocessing_spec
from msl_kit.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[1]
SPECS = {"bninception": preprocessing_spec("bninception"), "resnet": preprocessing_spec("resnet50")}


class ToRange:
    """RGB [0, 1] tensor -> the spec's channel order and range (picklable, for workers)."""

    def __init__(self, spec: Preprocessing):
        self.bgr, self.value_range = spec.color == "BGR", spec.value_range

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return (t.flip(0) if self.bgr else t) * self.value_range


def plain_transform(spec: Preprocessing, train: bool) -> tv.Compose:
    geometry = (
        [
            tv.Resize(spec.resize_size),
            tv.RandomResizedCrop(spec.input_size, scale=spec.crop_scale),
            tv.RandomHorizontalFlip(),
        ]
        if train
        else [tv.Resize(spec.resize_size), tv.CenterCrop(spec.input_size)]
    )
    return tv.Compose(geometry + [tv.ToTensor(), ToRange(spec), tv.Normalize(spec.mean, spec.std)])


def plain_dataset(ddir: Path, spec: Preprocessing, train: bool) -> Subset:
    """ImageFolder over CUB's images/ folder, restricted to the training classes 1-100."""
    images = next(ddir.rglob("images.txt")).parent / "images"
    folder = tvd.ImageFolder(str(images), transform=plain_transform(spec, train))
    keep = [i for i, (_, y) in enumerate(folder.samples) if int(folder.classes[y][:3]) <= 100]
    return Subset(folder, keep)


def time_loader(dataset, args: argparse.Namespace, seed: int) -> float:
    """Images per second from the first batch to the last (worker start-up excluded)."""
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=True,
    )
    count, start = 0, None
    for i, batch in enumerate(loader):
        if i == 0:
            start = time.perf_counter()
        else:
            count += len(batch[0])
        if i == args.batches:
            break
    return count / (time.perf_counter() - start)


def _gradient_energy(t: torch.Tensor) -> float:
    return float(t.diff(dim=-1).pow(2).mean() + t.diff(dim=-2).pow(2).mean())


def crop_check(photos: list[Image.Image], spec: Preprocessing, seeds: int) -> dict[str, list]:
    """Per mode, per (photo, seed): mean |ours - torchvision| / range and gradient-energy ratio."""
    reference = plain_transform(spec, train=True)
    unit = spec.value_range / float(np.mean(spec.std))
    out: dict[str, list] = {"two_step": [], "fused": [], "energy": []}
    for photo in photos:
        for seed in range(seeds):
            torch.manual_seed(seed)
            ref = reference(photo)
            for mode in ("two_step", "fused"):
                torch.manual_seed(seed)
                ours = build_transform(dataclasses.replace(spec, crop=mode), train=True)(photo)
                out[mode].append(float((ours - ref).abs().mean()) / unit)
                if mode == "fused":
                    out["energy"].append(_gradient_energy(ours) / _gradient_energy(ref))
    return out


def print_checks(ddir: Path, root: Path, spec: Preprocessing, seeds: int) -> None:
    """Eval agreement with torchvision, then the crop modes on real photos."""
    ours_eval = datasets.build("cub200", root, "train", build_transform(spec, train=False))
    plain_eval = plain_dataset(ddir, spec, train=False)
    assert len(ours_eval) == len(plain_eval), (len(ours_eval), len(plain_eval))
    unit = spec.value_range / float(np.mean(spec.std))
    plain_index = {
        Path(path).resolve(): i
        for i, (path, _) in (
            (j, plain_eval.dataset.samples[k]) for j, k in enumerate(plain_eval.indices)
        )
    }
    gaps = []
    for i in range(0, len(ours_eval), 700):
        theirs = plain_eval[plain_index[(ddir / ours_eval.paths[i]).resolve()]][0]
        gaps.append(float((ours_eval[i][0] - theirs).abs().mean()) / unit)
    print(
        f"check: eval tensors of msl_kit ({spec.crop}) and torchvision differ by "
        f"{max(gaps):.5f} of the pixel range at most (mean abs, {len(gaps)} images)"
    )
    native = [
        load_image(ddir / ours_eval.paths[i], "RGB")
        for i in range(0, len(ours_eval), len(ours_eval) // 10)
    ][:10]
    rescaled = [
        p.resize((500, 375) if i % 2 else (640, 427), Image.Resampling.LANCZOS)
        for i, p in enumerate(native)
    ]
    for label, photos in (("227x227 (as stored)", native), ("500x375 / 640x427", rescaled)):
        res = crop_check(photos, spec, seeds)
        print(
            f"check: train crops vs torchvision two-step, {len(photos)} photos {label} x "
            f"{seeds} seeds: mean abs diff / pixel range"
        )
        for mode in ("two_step", "fused"):
            d = np.array(res[mode])
            print(
                f"    {mode:<9} median {np.median(d):.4f}  p90 {np.quantile(d, 0.9):.4f}  "
                f"worst {d.max():.4f}"
            )
        e = np.array(res["energy"])
        print(
            f"    fused gradient energy / two-step: median {np.median(e):.2f}x, "
            f"range {e.min():.2f}-{e.max():.2f}x"
        )


def cpu_ms_per_image(dataset, count: int = 300, rounds: int = 3) -> float:
    """Median over rounds of CPU ms (this process, process_time) to read + transform one item.

    CPU time, unlike the DataLoader's wall-clock rate, hardly moves when other processes
    share the cores.
    """
    times = []
    for r in range(rounds):
        torch.manual_seed(r)
        start = time.process_time()
        for i in range(count):
            dataset[(i * 7919) % len(dataset)]
        times.append((time.process_time() - start) / count * 1000)
    return float(np.median(times))


def time_all(contenders: dict, args: argparse.Namespace) -> dict[str, list[float]]:
    speeds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            speeds[name].append(time_loader(contenders[name], args, seed=r))
            print(f"round {r}: {name:<33} {speeds[name][-1]:8.1f} images/s", flush=True)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", help="a root where cub200 is prepared (default: a temporary one)")
    parser.add_argument(
        "--archive", default=str(REPO.parent / "shared" / "data" / "CUB_200_2011_subset100.tgz")
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument(
        "--batches", type=int, default=40, help="timed batches per round (after the first)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spec", choices=sorted(SPECS), default="bninception")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    parser.add_argument("--seeds", type=int, default=20, help="draws per photo in the crop check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = SPECS[args.spec]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        if not datasets.is_prepared("cub200", root):
            if not Path(args.archive).is_file():
                raise SystemExit(
                    f"no prepared cub200 under {root} and no archive at "
                    f"{args.archive}: pass --root or --archive"
                )
            datasets.prepare("cub200", root, archive=args.archive, progress=False)
        ddir = datasets.dataset_dir("cub200", root)
        print_checks(ddir, root, spec, args.seeds)
        contenders = {"torchvision ImageFolder + PIL": plain_dataset(ddir, spec, train=True)}
        for mode in ("two_step", "fused"):
            tf = build_transform(dataclasses.replace(spec, crop=mode), train=True)
            contenders[f"msl_kit build, crop={mode}"] = datasets.build("cub200", root, "train", tf)
        cpu = {name: cpu_ms_per_image(ds) for name, ds in contenders.items()}
        speeds = time_all(contenders, args)

    names = list(contenders)
    print(
        f"\nCUB subset train split ({len(contenders[names[1]])} images), {args.spec} train "
        f"transform, {args.workers} workers, batch {args.batch_size}, {args.batches} timed "
        f"batches x {args.rounds} rounds"
    )
    print(
        f"{'pipeline':<34}{'median img/s':>14}{'min':>9}{'max':>9}{'ratio':>8}"
        f"{'CPU ms/img':>12}{'ratio':>8}"
    )
    base = float(np.median(speeds[names[0]]))
    for name in names:
        s = speeds[name]
        print(
            f"{name:<34}{np.median(s):14.1f}{min(s):9.1f}{max(s):9.1f}"
            f"{np.median(s) / base:7.2f}x{cpu[name]:12.2f}{cpu[names[0]] / cpu[name]:7.2f}x"
        )


if __name__ == "__main__":
    main()
