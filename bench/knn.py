"""Exact top-k kNN of msl_kit.metrics against faiss IndexFlatIP (the kNN behind recall_at_k).

    python bench/knn.py [--n 60000] [--dim 512] [--k 32] [--threads 2] [--repeats 3]
                        [--block-sizes 2048 4096 8192] [--inputs random|clustered]

N x D unit vectors (seed 0), query = gallery: "random" (isotropic) or "clustered" (classes of
5 around shared-direction centres, as a trained model's embeddings look; the pruning of the
running top-k depends on the score distribution, so both are worth timing), each query's own
index excluded (faiss searches k + 1 and drops the query, as pytorch-metric-learning does).
Every timed call runs in a fresh subprocess, contenders interleaved repeat by repeat, on the same
thread count (torch.set_num_threads and faiss.omp_set_num_threads). Time is wall time of
the call alone (data made and libraries warmed before). Peak memory is the rise of the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs just before the call) over
its RSS just before the call. The first repeat also checks that both return the same
neighbour sets (rows may differ only where scores tie within float rounding) and the same
Recall@K for SOP-like labels (about 5 images per class).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this bench needs Linux)")


def make_labels(n: int, inputs: str) -> np.ndarray:
    """SOP-like labels, about 5 images per class (the clusters' classes for "clustered")."""
    if inputs == "clustered":
        return np.arange(n) // 5
    return np.random.default_rng(1).integers(0, max(1, n // 5), n)


def make_data(n: int, dim: int, inputs: str = "random") -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if inputs == "clustered":  # centres: one shared direction + a 15-d class part, plus noise
        labels = make_labels(n, inputs)
        basis = np.linalg.qr(rng.standard_normal((dim, 16)))[0].astype(np.float32)
        centres = (
            0.5 * basis[:, 0]
            + rng.standard_normal((labels[-1] + 1, 15), dtype=np.float32) @ basis[:, 1:].T / 4
        )
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[labels] + 0.6 * x / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def worker(args: argparse.Namespace) -> None:
    """One timed call in this fresh process; prints a JSON line, may save the indices."""
    import faiss
    import torch

    from msl_kit.metrics import knn

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    x = make_data(args.n, args.dim, args.inputs)
    small = x[:512].copy()  # warm both libraries (thread pools, BLAS) outside the timing

    if args.worker == "faiss":

        def run(data):
            index = faiss.IndexFlatIP(data.shape[1])
            index.add(data)
            sims, idx = index.search(data, args.k + 1)
            is_self = idx == np.arange(len(data))[:, None]
            is_self[~is_self.any(1), -1] = True  # query not found: drop the (k+1)-th instead
            keep = ~is_self
            return sims[keep].reshape(len(data), -1), idx[keep].reshape(len(data), -1)
    else:
        block = int(args.worker.split("=")[1])

        def run(data):
            sims, idx = knn(torch.from_numpy(data), args.k, block_size=block)
            return sims.numpy(), idx.numpy()

    run(small)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False  # then VmHWM is the peak since start: an upper bound
    rss_before = _status_kib("VmRSS")
    t0, cpu0 = time.perf_counter(), time.process_time()
    sims, idx = run(x)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    peak_mib = (_status_kib("VmHWM") - rss_before) / 1024
    if args.save:
        np.save(args.save + "_idx.npy", idx)
        np.save(args.save + "_sims.npy", sims)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "peak_mib": peak_mib,
                "hwm_reset": hwm_reset,
            }
        )
    )


def check_same(k: int, n: int, paths: dict[str, str], inputs: str) -> None:
    """Neighbour sets and Recall@K of every contender against faiss."""
    ref_idx = np.load(paths["faiss"] + "_idx.npy")
    ref_sims = np.load(paths["faiss"] + "_sims.npy")
    labels = make_labels(n, inputs)
    ks = [kk for kk in (1, 2, 4, 8, 16, 32) if kk <= k]

    def recall(idx):
        found = np.cumsum(labels[idx] == labels[:, None], axis=1) > 0
        return [float(found[:, kk - 1].mean()) for kk in ks]

    for name, path in paths.items():
        if name == "faiss":
            continue
        idx, sims = np.load(path + "_idx.npy"), np.load(path + "_sims.npy")
        same_rows = np.array([set(a) == set(b) for a, b in zip(idx, ref_idx)])
        sim_gap = float(np.abs(np.sort(sims, 1) - np.sort(ref_sims, 1)).max())
        # a differing row is fine only if its k-th scores tie within float rounding
        kth_gap = np.abs(sims[~same_rows, -1] - ref_sims[~same_rows, -1])
        ok = sim_gap < 1e-5 and (kth_gap < 1e-5).all() and recall(idx) == recall(ref_idx)
        print(
            f"check {name}: {(~same_rows).sum()} of {n} rows differ from faiss's neighbour set "
            f"(k-th scores within {kth_gap.max(initial=0):.1e} there: ties), "
            f"max |sorted sims - faiss's| {sim_gap:.1e}, "
            f"Recall@{ks} equal: {recall(idx) == recall(ref_idx)} -> {'OK' if ok else 'MISMATCH'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--block-sizes",
        type=int,
        nargs="*",
        default=[0],
        help="ours at these block sizes (0 = the library default)",
    )
    parser.add_argument("--inputs", choices=["random", "clustered"], default="random")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from msl_kit.metrics import DEFAULT_BLOCK_SIZE

    contenders = ["faiss"] + [f"ours,block={b or DEFAULT_BLOCK_SIZE}" for b in args.block_sizes]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {c: str(Path(tmp) / c.replace(",", "_").replace("=", "")) for c in contenders}
        for rep in range(args.repeats):
            for c in contenders:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    c.split(",")[-1] if c != "faiss" else "faiss",
                    "--n",
                    str(args.n),
                    "--dim",
                    str(args.dim),
                    "--k",
                    str(args.k),
                    "--threads",
                    str(args.threads),
                    "--inputs",
                    args.inputs,
                ] + (["--save", paths[c]] if rep == 0 else [])
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{c} failed:\n{out.stderr}")
                results[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
                last = results[c][-1]
                print(
                    f"repeat {rep}: {c:<16} {last['seconds']:8.2f} s wall "
                    f"{last['cpu_seconds']:8.2f} s cpu",
                    flush=True,
                )
        check_same(args.k, args.n, paths, args.inputs)

    print(
        f"\nN={args.n} D={args.dim} inputs={args.inputs} k={args.k} threads={args.threads} "
        f"repeats={args.repeats} "
        f"(medians; cpu = process CPU time of all threads, steadier on a shared machine;\n"
        f" peak = max over repeats of the peak-RSS rise during the call)"
    )
    print(
        f"{'contender':<18}{'wall s':>8}{'min s':>8}{'vs faiss':>10}"
        f"{'cpu s':>8}{'vs faiss':>10}{'peak MiB':>10}"
    )
    faiss_wall = float(np.median([r["seconds"] for r in results["faiss"]]))
    faiss_cpu = float(np.median([r["cpu_seconds"] for r in results["faiss"]]))
    for c in contenders:
        wall = [r["seconds"] for r in results[c]]
        cpu = float(np.median([r["cpu_seconds"] for r in results[c]]))
        peak = max(r["peak_mib"] for r in results[c])
        flag = "" if all(r["hwm_reset"] for r in results[c]) else " (peak since start)"
        print(
            f"{c:<18}{np.median(wall):8.2f}{min(wall):8.2f}{np.median(wall) / faiss_wall:9.2f}x"
            f"{cpu:8.2f}{cpu / faiss_cpu:9.2f}x{peak:10.0f}{flag}"
        )


if __name__ == "__main__":
    main()
