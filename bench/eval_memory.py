"""BN-Inception evaluation memory: msl_kit's backbone against pretrainedmodels' `features()`.

    python bench/eval_memory.py [--batch 32] [--size 227] [--threads 2] [--repeats 1]

Each contender runs in a fresh Python process (so one cannot inherit the other's freed
memory): build the network, run a 2-image warm-up forward (library caches, thread pools),
reset the kernel's peak-RSS counter (/proc/self/clear_refs), then one `torch.no_grad()`
forward of a (batch, 3, size, size) batch, pooled to (batch, 1024). Reported per contender:
RSS before the forward, the process's peak RSS during it (VmHWM), and the rise = peak - before,
which is what the forward itself needed. Ratios are ours / pretrainedmodels. Both use the
same weights (random, seeded) and the same input; the pooled features are compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("pretrainedmodels", "ours")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(name: str, batch: int, size: int, threads: int, out: str) -> None:
    """One measurement in this (fresh) process; writes a JSON line to `out`."""
    import pretrainedmodels
    import torch
    import torch.nn.functional as F

    from msl_kit.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    peer = pretrainedmodels.bninception(pretrained=None).eval()
    if name == "ours":
        model = build_model("bninception").backbone.eval()
        model.load_state_dict(
            {k: v for k, v in peer.state_dict().items() if not k.startswith("last_linear.")}
        )
        del peer

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model(x)
    else:

        def forward(x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_max_pool2d(peer.features(x), 1).flatten(1)

    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=gen) * 50
    with torch.no_grad():
        forward(images[:2])  # warm-up: one-off allocations are not the forward's cost
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
        before = _status_kib("VmRSS")
        features = forward(images)
        peak = _status_kib("VmHWM")
    torch.save(features, out + ".pt")
    Path(out).write_text(json.dumps({"before_kib": before, "peak_kib": peak, "reset": reset}))


def measure(name: str, args: argparse.Namespace, tmp: Path, run: int) -> dict:
    out = tmp / f"{name}{run}.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": str(args.threads),
    }
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            name,
            "--batch",
            str(args.batch),
            "--size",
            str(args.size),
            "--threads",
            str(args.threads),
            "--out",
            str(out),
        ],
        check=True,
        env=env,
    )
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=227)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per contender")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch, args.size, args.threads, args.out)
        return

    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            name: [measure(name, args, Path(tmp), r) for r in range(args.repeats)]
            for name in CONTENDERS
        }
        same = torch.equal(
            torch.load(Path(tmp) / "ours0.json.pt", weights_only=True),
            torch.load(Path(tmp) / "pretrainedmodels0.json.pt", weights_only=True),
        )
    mib = 1 / 1024
    print(
        f"BN-Inception no-grad forward, batch {args.batch}, {args.size} px, fp32, CPU, "
        f"{args.threads} threads, fresh process each, {args.repeats} run(s) (max shown)"
    )
    if not all(r["reset"] for rs in runs.values() for r in rs):
        print("note: could not reset the peak-RSS counter; peaks include the set-up")
    print(f"{'contender':<18}{'RSS before MiB':>16}{'peak RSS MiB':>14}{'rise MiB':>10}")
    rows = {}
    for name, rs in runs.items():
        before = max(r["before_kib"] for r in rs) * mib
        peak = max(r["peak_kib"] for r in rs) * mib
        rise = max(r["peak_kib"] - r["before_kib"] for r in rs) * mib
        rows[name] = (peak, rise)
        print(f"{name:<18}{before:>16.0f}{peak:>14.0f}{rise:>10.0f}")
    (peer_peak, peer_rise), (peak, rise) = rows["pretrainedmodels"], rows["ours"]
    print(
        f"ours / pretrainedmodels: peak RSS {peak / peer_peak:.2f}x, rise {rise / peer_rise:.2f}x"
    )
    print(f"pooled features bit-identical: {same}")


if __name__ == "__main__":
    main()
