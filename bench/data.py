"""Training-pipeline throughput on the CUB subset: msl_kit.datasets.build + build_transform
against a plain torchvision ImageFolder + PIL pipeline with the same transforms.

    python bench/data.py [--root DIR] [--archive ../shared/data/CUB_200_2011_subset100.tgz]
                         [--workers 2] [--batch-size 80] [--batches 40] [--rounds 3]
                         [--spec bninception|resnet] [--threads 1]

Both read the same CUB training images (classes 1-100) in a seeded shuffled order through a
DataLoader with the same worker count, batch size and train transform (BN-Inception: Resize 256
-> RandomResizedCrop 227 scale (0.16, 1) -> flip -> BGR 0-255 minus mean; ResNet: RGB, ImageNet
mean/std, 224). The dataset is prepared into a temporary folder from --archive unless --root
holds it already. Each round times each pipeline from its first batch (workers started) to its
last, pipelines interleaved with the order alternating by round; images/s is the median over
rounds. Before timing, the eval transforms of both are compared on a few images.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets as tvd
from torchvision import transforms as tv

from msl_kit import datasets
from msl_kit.transforms import Preprocessing, build_transform

REPO = Path(__file__).resolve().parents[1]
SPECS = {
    "bninception": Preprocessing(color="BGR", value_range=255.0, mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0),
                                 input_size=227, resize_size=256, crop_scale=(0.16, 1.0), hflip=True),
    "resnet": Preprocessing(),
}


class ToRange:
    """RGB [0, 1] tensor -> the spec's channel order and range (picklable, for workers)."""

    def __init__(self, spec: Preprocessing):
        self.bgr, self.value_range = spec.color == "BGR", spec.value_range

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return (t.flip(0) if self.bgr else t) * self.value_range


def plain_transform(spec: Preprocessing, train: bool) -> tv.Compose:
    geometry = ([tv.Resize(spec.resize_size), tv.RandomResizedCrop(spec.input_size, scale=spec.crop_scale),
                 tv.RandomHorizontalFlip()] if train else
                [tv.Resize(spec.resize_size), tv.CenterCrop(spec.input_size)])
    return tv.Compose(geometry + [tv.ToTensor(), ToRange(spec), tv.Normalize(spec.mean, spec.std)])


def plain_dataset(ddir: Path, spec: Preprocessing, train: bool) -> Subset:
    """ImageFolder over CUB's images/ folder, restricted to the training classes 1-100."""
    images = next(ddir.rglob("images.txt")).parent / "images"
    folder = tvd.ImageFolder(str(images), transform=plain_transform(spec, train))
    keep = [i for i, (_, y) in enumerate(folder.samples) if int(folder.classes[y][:3]) <= 100]
    return Subset(folder, keep)


def time_loader(dataset, args: argparse.Namespace, seed: int) -> float:
    """Images per second from the first batch to the last (worker start-up excluded)."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(seed), drop_last=True)
    count, start = 0, None
    for i, batch in enumerate(loader):
        if i == 0:
            start = time.perf_counter()
        else:
            count += len(batch[0])
        if i == args.batches:
            break
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="a root where cub200 is prepared (default: a temporary one)")
    parser.add_argument("--archive", default=str(REPO.parent / "shared" / "data" / "CUB_200_2011_subset100.tgz"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per round (after the first)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spec", choices=sorted(SPECS), default="bninception")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = SPECS[args.spec]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        if not datasets.is_prepared("cub200", root):
            if not Path(args.archive).is_file():
                raise SystemExit(f"no prepared cub200 under {root} and no archive at {args.archive}: pass --root or --archive")
            datasets.prepare("cub200", root, archive=args.archive, progress=False)
        ddir = datasets.dataset_dir("cub200", root)
        contenders = {
            "torchvision ImageFolder + PIL": plain_dataset(ddir, spec, train=True),
            "msl_kit build + build_transform": datasets.build("cub200", root, "train", build_transform(spec, train=True)),
        }
        ours_eval = datasets.build("cub200", root, "train", build_transform(spec, train=False))
        plain_eval = plain_dataset(ddir, spec, train=False)
        assert len(ours_eval) == len(plain_eval), (len(ours_eval), len(plain_eval))
        unit = spec.value_range / float(np.mean(spec.std))
        plain_index = {Path(path).resolve(): i for i, (path, _) in
                       ((j, plain_eval.dataset.samples[k]) for j, k in enumerate(plain_eval.indices))}
        gaps = [float((ours_eval[i][0] - plain_eval[plain_index[(ddir / ours_eval.paths[i]).resolve()]][0])
                      .abs().mean()) / unit for i in range(0, len(ours_eval), 700)]
        print(f"check: eval tensors of both pipelines differ by {max(gaps):.5f} of the pixel range at most "
              f"(mean abs, {len(gaps)} images; one resampling instead of two)")

        speeds: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                speeds[name].append(time_loader(contenders[name], args, seed=r))
                print(f"round {r}: {name:<33} {speeds[name][-1]:8.1f} images/s", flush=True)

    print(f"\nCUB subset train split ({len(contenders[names[1]])} images), {args.spec} train transform, "
          f"{args.workers} workers, batch {args.batch_size}, {args.batches} timed batches x {args.rounds} rounds")
    print(f"{'pipeline':<34}{'median img/s':>14}{'min':>9}{'max':>9}{'ratio':>8}")
    base = float(np.median(speeds[names[0]]))
    for name in names:
        s = speeds[name]
        print(f"{name:<34}{np.median(s):14.1f}{min(s):9.1f}{max(s):9.1f}{np.median(s) / base:7.2f}x")


if __name__ == "__main__":
    main()
