"""Forward + backward time of msl_kit's MS loss vs PML's miner + loss vs a per-anchor loop.

    python bench/loss.py [--sizes 80x512 256x512 1024x512 4096x512] [--repeats 15]
                         [--inputs random clustered] [--threads 2] [--device cpu]
                         [--loop-max 256]

Contenders run interleaved (rotating order) inside every repeat; the table shows the
median over repeats of the time per call. The loop (one anchor at a time, the released
code's structure) only runs where it is affordable (B <= --loop-max). Batches are P x K
with K = 5 as in the released recipe, rows L2-normalised, float32. Two input distributions:
"random" unit vectors (similarities near 0, almost every negative mined) and "clustered"
ones that look like a trained model's batch: class centres plus noise, positive
similarities about 0.6-0.85 and negatives about 0-0.4 (10th-90th percentiles, printed).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from msl_kit.losses import MultiSimilarityLoss

ALPHA, BETA, LAM, MARGIN = 2.0, 40.0, 0.5, 0.1


def loop_ms(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The released structure: S = X X^T, then one Python iteration per anchor."""
    sim = emb @ emb.T
    idx = torch.arange(len(labels), device=emb.device)
    total = []
    for i in range(len(labels)):
        same = labels == labels[i]
        pos, neg = sim[i][same & (idx != i)], sim[i][~same]
        if len(pos) == 0 or len(neg) == 0:
            continue
        neg_kept = neg[neg + MARGIN > pos.min()]
        pos_kept = pos[pos - MARGIN < neg.max()]
        if len(neg_kept) == 0 or len(pos_kept) == 0:
            continue
        total.append(
            torch.log1p(torch.exp(-ALPHA * (pos_kept - LAM)).sum()) / ALPHA
            + torch.log1p(torch.exp(BETA * (neg_kept - LAM)).sum()) / BETA
        )
    if not total:
        return sim.sum() * 0
    return torch.stack(total).sum() / len(labels)


def make_inputs(kind: str, batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) unit rows and P x K labels (K = 5), "random" or "clustered" (see the docstring)."""
    gen = torch.Generator().manual_seed(batch)
    labels = torch.arange(batch) // 5
    if kind == "random":
        return F.normalize(torch.randn(batch, dim, generator=gen), dim=1), labels
    # centres share one direction and differ in a 15-d subspace, so negatives spread over
    # 0-0.4 instead of sitting at 0; per-sample noise spreads the positives over 0.6-0.85
    basis = torch.linalg.qr(torch.randn(dim, 16, generator=gen))[0]
    spread = torch.randn(int(labels[-1]) + 1, 15, generator=gen) @ basis[:, 1:].T / 15**0.5
    centres = F.normalize(0.5 * basis[:, 0] + spread, dim=1)
    noise = (0.3 + 0.6 * torch.rand(batch, 1, generator=gen)) / dim**0.5
    x = centres[labels] + noise * torch.randn(batch, dim, generator=gen)
    return F.normalize(x, dim=1), labels


def describe(x: torch.Tensor, y: torch.Tensor) -> str:
    """10/50/90 % quantiles of positive and negative similarities and the mined fractions."""
    from msl_kit.losses import MSParams, mining_stats

    with torch.no_grad():
        s = mining_stats(x @ x.T, y, MSParams(ALPHA, BETA, LAM, MARGIN))
    return (
        f"pos {s['sim_pos_q10']:.2f}/{s['sim_pos_q50']:.2f}/{s['sim_pos_q90']:.2f} "
        f"neg {s['sim_neg_q10']:.2f}/{s['sim_neg_q50']:.2f}/{s['sim_neg_q90']:.2f}, "
        f"mined {100 * s['pos_kept']:.0f}% pos {100 * s['neg_kept']:.1f}% neg"
    )


def make_contenders(loop_ok: bool) -> dict[str, Callable]:
    from pytorch_metric_learning import losses, miners

    ours = MultiSimilarityLoss(ALPHA, BETA, LAM, MARGIN)
    miner = miners.MultiSimilarityMiner(epsilon=MARGIN)
    pml_loss = losses.MultiSimilarityLoss(alpha=ALPHA, beta=BETA, base=LAM)
    contenders = {
        "ours": lambda x, y: ours(x, y),
        "pml": lambda x, y: pml_loss(x, y, miner(x, y)),
    }
    if loop_ok:
        contenders["loop"] = loop_ms
    return contenders


def time_calls(fn: Callable, x: torch.Tensor, y: torch.Tensor, calls: int) -> float:
    """Seconds per forward + backward call, averaged over `calls`."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        x.grad = None
        fn(x, y).backward()
    sync()
    return (time.perf_counter() - start) / calls


def bench_size(
    inputs: str,
    batch: int,
    dim: int,
    repeats: int,
    device: str,
    loop_max: int,
    target_s: float = 0.02,
) -> dict[str, float]:
    """Median ms per call for each contender at one B x D on one input distribution."""
    x, y = make_inputs(inputs, batch, dim)
    x, y = x.to(device).requires_grad_(True), y.to(device)
    contenders = make_contenders(batch <= loop_max)
    with torch.no_grad():  # the contenders must compute the same loss before we time them
        ref = contenders["pml"](x, y)
        for name, fn in contenders.items():
            value = fn(x, y)
            if not torch.allclose(value, ref, rtol=1e-4, atol=1e-6):
                raise RuntimeError(
                    f"{name} gives {value.item()} but PML {ref.item()} at {batch}x{dim} ({inputs})"
                )
    for fn in contenders.values():  # warm-up
        time_calls(fn, x, y, 2)
    # one call count for all contenders so that each repeat takes about target_s for ours
    calls = max(1, int(target_s / time_calls(contenders["ours"], x, y, 3)))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            n = calls if name == "ours" else max(1, calls // 10) if name == "loop" else calls
            times[name].append(time_calls(contenders[name], x, y, n))
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def main() -> None:
    """Parse arguments, run every size, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["80x512", "256x512", "1024x512", "4096x512"])
    parser.add_argument(
        "--inputs", nargs="+", default=["random", "clustered"], choices=["random", "clustered"]
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loop-max", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, float32, median of {args.repeats}"
    )
    for kind in args.inputs:
        for size in args.sizes:
            batch, dim = (int(v) for v in size.lower().split("x"))
            print(f"{kind} {size}: {describe(*make_inputs(kind, batch, dim))}")
    header = (
        f"{'inputs':>9} {'B x D':>10} {'ours ms':>9} {'PML ms':>9} {'loop ms':>9} "
        f"{'ours/PML':>9} {'loop/ours':>10}"
    )
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        batch, dim = (int(v) for v in size.lower().split("x"))
        for kind in args.inputs:
            ms = bench_size(kind, batch, dim, args.repeats, args.device, args.loop_max)
            loop = f"{ms['loop']:9.3f}" if "loop" in ms else f"{'-':>9}"
            speedup = f"{ms['loop'] / ms['ours']:9.1f}x" if "loop" in ms else f"{'-':>10}"
            print(
                f"{kind:>9} {size:>10} {ms['ours']:9.3f} {ms['pml']:9.3f} {loop} "
                f"{ms['ours'] / ms['pml']:8.2f}x {speedup}",
                flush=True,
            )


if __name__ == "__main__":
    main()
