"""BN-Inception training-step throughput: msl_kit's model against pretrainedmodels' own.

    python bench/train_step.py [--batch 16] [--size 227] [--repeats 5] [--threads 2]
                               [--channels-last] [--memory]

Both sides run forward + backward of the same network on the same input with the same loss:
ours is `build_model("bninception")`; the peer is `pretrainedmodels.bninception(pretrained=None)`
with `features()`, global max pooling and the same Linear head, written the way a user would.
BatchNorm is frozen on both (the released recipe) unless --bn train. Timings are interleaved
(ours, peer, ours, ...) so machine noise hits both; the median of the repeats is reported.
With --memory, each contender also runs in a fresh process: one warm-up step, then the peak-RSS
rise (VmHWM after reset minus VmRSS before) of one more train step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from msl_kit.models import build_model


def embedding_loss(embeddings: torch.Tensor) -> torch.Tensor:
    # Any loss that touches every embedding; the MS loss itself is benchmarked elsewhere.
    return (embeddings @ embeddings.T).pow(2).mean()


class PeerModel(nn.Module):
    """pretrainedmodels' BN-Inception + max pooling + Linear + L2 norm, as a user would write it."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        import pretrainedmodels

        self.net = pretrainedmodels.bninception(pretrained=None)
        self.fc = nn.Linear(1024, embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.adaptive_max_pool2d(self.net.features(images), 1).flatten(1)
        return F.normalize(self.fc(features), dim=1)


def freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()


def images_per_second(model: nn.Module, images: torch.Tensor, steps: int) -> float:
    """Forward + backward `steps` times; returns images per second."""
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        embedding_loss(model(images)).backward()
    sync()
    return steps * images.shape[0] / (time.perf_counter() - start)


def build_contenders(args: argparse.Namespace) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """name -> (model in train mode, input batch), same weights and input for all."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    ours = build_model("bninception", embedding_dim=512, freeze_bn=args.bn == "frozen")
    peer = PeerModel(512)
    # Same weights on both sides, so nothing but the code differs.
    ours.backbone.load_state_dict(
        {k: v for k, v in peer.net.state_dict().items() if not k.startswith("last_linear.")}
    )
    ours.head.linear.load_state_dict(peer.fc.state_dict())
    images = torch.randn(args.batch, 3, args.size, args.size) * 50
    contenders = {
        "ours": (ours.to(device), images.to(device)),
        "pretrainedmodels": (peer.to(device), images.to(device)),
    }
    if args.channels_last:
        ours_cl = build_model("bninception", embedding_dim=512, freeze_bn=args.bn == "frozen")
        ours_cl.load_state_dict(ours.state_dict())
        contenders["ours channels_last"] = (
            ours_cl.to(device, memory_format=torch.channels_last),
            images.to(device, memory_format=torch.channels_last),
        )
    for model, _ in contenders.values():
        model.train()
        if args.bn == "frozen":
            freeze_batchnorm(model)
    return contenders


def _kib(field: str) -> int:
    line = next(
        x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":")
    )
    return int(line.split()[1])


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: the peak-RSS rise of one train step of `args.child`."""
    model, batch = build_contenders(args)[args.child]
    images_per_second(model, batch, 1)  # warm-up; its gradients stay allocated, as in training
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = _kib("VmRSS")
    images_per_second(model, batch, 1)
    Path(args.out).write_text(json.dumps({"rise_mib": (_kib("VmHWM") - before) / 1024}))


def memory_rises(args: argparse.Namespace, names: list[str]) -> dict[str, float]:
    """Peak-RSS rise (MiB) of one train step per contender, each in a fresh process."""
    import tempfile

    rises = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / "rise.json"
            argv = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--out",
                str(out),
                "--batch",
                str(args.batch),
                "--size",
                str(args.size),
                "--threads",
                str(args.threads),
                "--bn",
                args.bn,
                "--device",
                args.device,
            ]
            if args.channels_last:
                argv.append("--channels-last")
            path = str(Path(__file__).resolve().parents[1])
            path += os.pathsep + os.environ.get("PYTHONPATH", "")
            subprocess.run(argv, check=True, env={**os.environ, "PYTHONPATH": path})
            rises[name] = json.loads(out.read_text())["rise_mib"]
    return rises


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=227)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="train steps per timing round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--channels-last", action="store_true", help="also time ours in channels_last"
    )
    parser.add_argument("--bn", choices=("frozen", "train"), default="frozen")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure each contender's peak-RSS rise (CPU, fresh processes)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args)
        return
    contenders = build_contenders(args)
    for model, batch in contenders.values():  # warm-up: allocator, cudnn autotuning, caches
        images_per_second(model, batch, 1)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, (model, batch) in contenders.items():
            rates[name].append(images_per_second(model, batch, args.steps))
    rises = memory_rises(args, list(contenders)) if args.memory else {}

    print(
        f"BN-Inception train step (forward + backward), batch {args.batch}, {args.size} px, "
        f"BN {args.bn}, device {args.device}, threads {args.threads}, "
        f"{args.repeats} x {args.steps} steps"
    )
    peer_rate = statistics.median(rates["pretrainedmodels"])
    print(
        f"{'model':<22}{'images/s (median)':>18}{'min':>9}{'max':>9}{'vs peer':>9}"
        + (f"{'step peak-RSS rise MiB':>24}" if rises else "")
    )
    for name, values in rates.items():
        rate = statistics.median(values)
        print(
            f"{name:<22}{rate:>18.2f}{min(values):>9.2f}{max(values):>9.2f}"
            f"{rate / peer_rate:>8.2f}x" + (f"{rises[name]:>24.0f}" if rises else "")
        )


if __name__ == "__main__":
    main()
