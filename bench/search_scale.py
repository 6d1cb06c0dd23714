"""Which index for which gallery size: exact search against faiss flat, IVF-Flat, IVF-PQ and
HNSW (msl_kit.use.ann, what `msl-kit search --faiss KIND` builds) on 10^5 - 10^6 vectors.

    python bench/search_scale.py [--checkpoint RUN_OR_FILE] [--sizes 100000 1000000]
        [--dim 256] [--queries 1000] [--k 10] [--threads 2] [--repeats 3] [--per-class 20]
        [--kinds exact flat ivf ivfpq hnsw] [--cli DIR]

The vectors are drawn from a trained model's embedding distribution, not uniform noise: the
model (a checkpoint, or the embedded default trained at --dim, 150 iterations, ~45 s) embeds all
4,840 embedded Omniglot images (242 characters); a Gaussian is fitted to its class means, the
within-class covariance is pooled, and each class's spread is kept as a scale. A gallery of N
holds N / --per-class synthetic classes drawn from that fit (normalised like the model's output),
and the queries are fresh draws of gallery classes (a new photo of a catalogued item). The fit
is checked first: a synthetic set of the real set's size beside the real one (R@1 by class,
similarity to the 1st and 10th neighbour and of random pairs, local intrinsic dimensionality).

Per size and kind, each in a fresh process: build time (faiss training and adding; measuring
the recall of each nprobe / efSearch on 1,000 gallery vectors held out of the index, and so
picking the knob, timed apart), memory (RSS held after the build, and the peak during build and
measurement, over the RSS with the gallery loaded), size on disk, queries per second (1,000
queries at once, best of --repeats), recall@1 and @k against exact search (a returned neighbour
counts when its true score reaches the exact k-th one: ties count as found), and the speed-up
over exact search timed in the same process, the two interleaved repeat by repeat (the machine's
load drifts between processes), in wall time and in the process's CPU time (which a busy
machine's waiting for a core does not count). A last table extrapolates each kind to 10^7
vectors from the measured sizes (a model on paper, said so). With --cli DIR the largest gallery
and its queries are also written as embeddings files (DIR/big.npz, DIR/q.npz, the kit's format)
and `msl-kit search` runs on them with and without `--faiss hnsw`: the issue's done-when, its
recall computed from the CSVs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from msl_kit import cli, datasets, metrics  # noqa: E402
from msl_kit.datasets import transforms  # noqa: E402
from msl_kit.train import evaluation, recipe  # noqa: E402
from msl_kit.train.checkpoint import load_model  # noqa: E402
from msl_kit.use.ann.faiss_index import AnnIndex  # noqa: E402
from msl_kit.use.ann.spec import IndexSpec, import_faiss, vectors_sha256  # noqa: E402
from msl_kit.use.index import FORMAT, write_npz  # noqa: E402


def status_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this bench needs Linux)")


def reset_peak() -> None:
    """Start VmHWM again from the current RSS."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def trained_run(base: Path, dim: int) -> Path:
    """The embedded default trained at `dim` (150 iterations)."""
    run = base / "run"
    args = ["train", "--set", "train.eval_every=0", "--set", f"model.embedding_dim={dim}"]
    args += ["--no-baseline", "--out", str(run)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(args) == 0
    return run


def real_embeddings(ckpt: Path) -> tuple[np.ndarray, np.ndarray]:
    """The model's vectors of all 4,840 embedded images and their character labels."""
    model, cfg = load_model(ckpt)
    tf = transforms.build_transform(recipe.preprocessing(cfg), train=False)
    xs, ys, offset = [], [], 0
    for split in ("train", "test"):
        ds = datasets.build("omniglot_small", None, split, tf)
        emb, labels = evaluation.extract(model, ds, torch.device("cpu"))[:2]
        xs.append(emb.numpy())
        ys.append(labels.numpy() + offset)
        offset += int(labels.max()) + 1
    return np.concatenate(xs), np.concatenate(ys)


class Fit:
    """Class means ~ N(mu, between-class covariance); a class's images ~ its mean + its scale
    x N(0, pooled within-class covariance); then L2-normalised, as the model's output is."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        classes, inverse = np.unique(y, return_inverse=True)
        means = np.stack([x[inverse == c].mean(0) for c in range(len(classes))])
        resid = x - means[inverse]
        spread = np.sqrt(np.bincount(inverse, (resid**2).sum(1)) / np.bincount(inverse))
        self.scale = spread / np.sqrt((resid**2).sum(1).mean())
        self.mu = means.mean(0)
        self.between = self.root(np.cov(means.T))
        self.within = self.root(resid.T @ resid / (len(x) - len(classes)))

    @staticmethod
    def root(cov: np.ndarray) -> np.ndarray:
        """L with L L^T = cov (eigenvalues clipped at 0)."""
        w, v = np.linalg.eigh(cov)
        return (v * np.sqrt(np.clip(w, 0, None))).astype(np.float32)

    def classes(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n class means and their spreads."""
        z = rng.standard_normal((n, len(self.mu)), dtype=np.float32)
        return self.mu + z @ self.between.T, self.scale[rng.integers(0, len(self.scale), n)]

    def draw(self, means, scales, labels, rng, chunk: int = 1 << 16) -> np.ndarray:
        """One normalised vector per label, made `chunk` rows at a time."""
        out = np.empty((len(labels), len(self.mu)), np.float32)
        for i in range(0, len(labels), chunk):
            lab = labels[i : i + chunk]
            z = rng.standard_normal((len(lab), len(self.mu)), dtype=np.float32)
            v = means[lab] + scales[lab, None] * (z @ self.within.T)
            out[i : i + chunk] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return out


def gallery_and_queries(fit: Fit, n: int, per: int, n_queries: int, seed: int = 0):
    """A gallery of n vectors in n / per classes, and fresh draws of its classes as queries."""
    rng = np.random.default_rng(seed)
    n_classes = max(1, n // per)
    means, scales = fit.classes(n_classes, rng)
    labels = np.arange(n) % n_classes
    q_labels = rng.integers(0, n_classes, n_queries)
    return fit.draw(means, scales, labels, rng), labels, fit.draw(means, scales, q_labels, rng)


def neighbour_stats(x: np.ndarray, y: np.ndarray, k: int = 20) -> dict[str, float]:
    """What a set's neighbourhoods look like: R@1 by class, similarity to the 1st and 10th
    neighbour and of random pairs, and the MLE local intrinsic dimensionality at k."""
    sims, ids = metrics.knn(x, k)
    sims, ids = sims.numpy().astype(np.float64), ids.numpy()
    a, b = np.random.default_rng(1).integers(0, len(x), (2, 20000))
    dist = np.sqrt(np.clip(2 - 2 * sims, 1e-12, None))  # Euclidean distance of unit vectors
    lid = -1 / np.log(dist[:, :-1] / dist[:, -1:]).mean(1)
    return {
        "R@1": float((y[ids[:, 0]] == y).mean()),
        "sim 1st": float(sims[:, 0].mean()),
        "sim 10th": float(sims[:, 9].mean()),
        "sim random pair": float((x[a] * x[b]).sum(1).mean()),
        "LID@20 (median)": float(np.median(lid)),
    }


def fidelity(fit: Fit, x: np.ndarray, y: np.ndarray) -> None:
    """The real embeddings beside a synthetic set of the same size and class count."""
    per = round(len(x) / len(np.unique(y)))
    v, labels, _ = gallery_and_queries(fit, len(x), per, 1, seed=7)
    real, synth = neighbour_stats(x, y), neighbour_stats(v, labels)
    print(f"\nsynthetic against real: {len(x):,} vectors, {len(np.unique(y))} classes each")
    print(f"{'':18s}{'real':>8s}{'synthetic':>11s}")
    for key in real:
        print(f"{key:18s}{real[key]:8.3f}{synth[key]:11.3f}")


def best_of(repeats: int, fn):
    """The fastest wall time of `repeats` calls and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def recall_vs(exact_scores: np.ndarray, q: np.ndarray, g: np.ndarray, ids: np.ndarray, k: int):
    """recall@k of `ids` against the exact top-k scores (a hit reaches the exact k-th)."""
    true = np.stack([(q * g[np.maximum(c, 0)]).sum(1) for c in ids[:, :k].T], 1)
    good = (ids[:, :k] >= 0) & (true >= exact_scores[:, k - 1, None] - 1e-5)
    return float(good.sum(1).mean() / k)


def worker(kind: str, data: Path, args) -> dict:
    """In a fresh process: build (or, for exact, run) one kind over DIR/g.npy and time the
    queries DIR/q.npy; memory is the RSS over that held after loading both."""
    g, q = np.load(data / "g.npy"), np.load(data / "q.npy")
    faiss = import_faiss()
    faiss.IndexFlatIP(8).search(np.zeros((64, 8), np.float32), 1)  # load faiss, start threads
    gc.collect()
    rss0 = status_kib("VmRSS")
    reset_peak()
    row = dict(kind=kind, build=0.0, tune=0.0, knob="metrics.knn", own=1.0)
    if kind == "exact":
        seconds, (sims, _) = best_of(args.repeats, lambda: metrics.knn(q, args.k, g))
        np.save(data / "exact.npy", sims.numpy())
        row.update(held=0.0, size=g.nbytes / 2**20, seconds=seconds, r1=1.0, rk=1.0)
        row.update(speedup=1.0, cpu_speedup=1.0)
        row["peak"] = (status_kib("VmHWM") - rss0) / 1024
        return row
    t0 = time.perf_counter()
    ann = AnnIndex.build(g, IndexSpec(kind), args.k, sha256="-")
    row.update(build=ann.build_seconds, tune=time.perf_counter() - t0 - ann.build_seconds)
    row.update(held=(status_kib("VmRSS") - rss0) / 1024, peak=(status_kib("VmHWM") - rss0) / 1024)
    path = data / f"{kind}.faiss"
    faiss.write_index(ann.index, str(path))
    row["size"] = path.stat().st_size / 2**20
    path.unlink()
    wall, cpu, ids = {"ann": [], "exact": []}, {"ann": [], "exact": []}, None
    for _ in range(args.repeats):  # interleaved with exact search: the ratio survives load drift
        for name, fn in (
            ("exact", lambda: metrics.knn(q, args.k, g)),
            ("ann", lambda: ann(q, args.k)),
        ):
            c0, t0 = time.process_time(), time.perf_counter()
            found = fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            ids = found[1] if name == "ann" else ids
    seconds = min(wall["ann"])
    row["speedup"] = min(wall["exact"]) / seconds
    row["cpu_speedup"] = min(cpu["exact"]) / min(cpu["ann"])
    exact = np.load(data / "exact.npy")
    row.update(seconds=seconds, knob=f"{ann.knob} {ann.search_value}".replace("None None", "-"))
    row.update(r1=recall_vs(exact, q, g, ids, 1), rk=recall_vs(exact, q, g, ids, args.k))
    row["own"] = ann.recall.get(args.k, 1.0)
    return row


def run_size(fit: Fit, n: int, args, tmp: Path) -> list[dict]:
    """Every kind on a gallery of n vectors, each in its own process, one after the other."""
    g, _, q = gallery_and_queries(fit, n, args.per_class, args.queries)
    np.save(tmp / "g.npy", g)
    np.save(tmp / "q.npy", q)
    rows = []
    for kind in ["exact", *(k for k in args.kinds if k != "exact")]:
        cmd = [sys.executable, __file__, "--worker", kind, "--data", str(tmp)]
        cmd += ["--k", str(args.k), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"worker {kind} failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\n{n:,} x {g.shape[1]} gallery, {len(q):,} queries, k = {args.k}, "
          f"{args.threads} threads, best of {args.repeats}")  # fmt: skip
    head = f"{'index':6s} {'build s':>8s} {'tune s':>7s} {'held MiB':>9s} {'peak MiB':>9s} "
    head += f"{'disk MiB':>9s} {'queries/s':>10s} {'R@1':>6s} {f'R@{args.k}':>6s} "
    print(head + f"{'(own)':>6s} {'speed-up':>9s} {'(cpu)':>6s}  search knob")
    for r in rows:
        print(
            f"{r['kind']:6s} {r['build']:8.1f} {r['tune']:7.1f} {r['held']:9.0f} {r['peak']:9.0f} "
            f"{r['size']:9.1f} {len(q) / r['seconds']:10.0f} {r['r1']:6.3f} {r['rk']:6.3f} "
            f"{r['own']:6.3f} {r['speedup']:8.1f}x {r['cpu_speedup']:5.1f}x  {r['knob']}"
        )
    if args.cli and n == max(args.sizes):
        done_when(g, q, Path(args.cli), args)
    return rows


GROWTH = {  # how each figure grows with N (the defaults scale nlist with sqrt(N))
    "exact": ("N", "N"),
    "flat": ("N", "N"),
    "ivf": ("N^1.5", "sqrt(N)"),  # add: N x nlist distances; search: nprobe / nlist of N
    "ivfpq": ("N^1.5", "sqrt(N)"),
    "hnsw": ("N log N", "log N"),
}


def model_10m(rows: list[dict], n: int, target: int = 10**7) -> None:
    """Each kind at `target` vectors from its figures at n: size and memory scale with N, build
    and search time as GROWTH says. A model on paper, not a measurement."""
    r = target / n
    grow = {"N": r, "N^1.5": r**1.5, "sqrt(N)": math.sqrt(r), "N log N": r * math.log(target)}
    grow["N log N"] /= math.log(n)
    grow["log N"] = math.log(target) / math.log(n)
    print(f"\nmodel for {target:,} vectors from the {n:,} row above (not measured):")
    print(f"{'index':6s} {'disk GiB':>9s} {'build min':>10s} {'queries/s':>10s}  grows as")
    for row in rows:
        build, search = GROWTH[row["kind"]]
        qps = 1000 / (row["seconds"] * grow[search])
        minutes = row["build"] * grow[build] / 60
        print(
            f"{row['kind']:6s} {row['size'] * r / 1024:9.1f} {minutes:10.1f} {qps:10.0f}  "
            f"build {build}, search {search}"
        )


def write_index_file(path: Path, vectors: np.ndarray, prefix: str, labels=None) -> None:
    """An embeddings file in the kit's format (what `msl-kit embed` writes)."""
    members = [("embeddings", vectors)]
    members += [("paths", np.char.add(prefix, np.arange(len(vectors)).astype(str)))]
    if labels is not None:
        members += [("labels", labels), ("classes", np.arange(labels.max() + 1).astype(str))]
    members += [("checkpoint", np.array("synthetic")), ("checkpoint_sha256", np.array("0" * 64))]
    members += [("embeddings_sha256", np.array(vectors_sha256(vectors)))]
    members += [("format", np.array(FORMAT))]
    with open(path, "wb") as f:
        write_npz(f, members)


def done_when(g: np.ndarray, q: np.ndarray, out: Path, args) -> None:
    """`msl-kit search --index big.npz --query q.npz -k K [--faiss hnsw] --out CSV`, both."""
    out.mkdir(parents=True, exist_ok=True)
    write_index_file(out / "big.npz", g, "gallery/")
    write_index_file(out / "q.npz", q, "query/")
    base = ["search", "--index", str(out / "big.npz"), "--query", str(out / "q.npz")]
    base += ["-k", str(args.k), "--show", "0"]
    print(f"\n$ msl-kit {' '.join(base[:-2])} --out {{exact,hnsw}}.csv [--faiss hnsw]")
    for name, extra in (
        ("exact", []),
        ("hnsw", ["--faiss", "hnsw"]),
        ("hnsw", ["--faiss", "hnsw"]),
    ):
        err = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert cli.main([*base, "--out", str(out / f"{name}.csv"), *extra]) == 0
        lines = [ln for ln in err.getvalue().splitlines() if not ln.startswith("Embedding")]
        print(f"[{name}, whole command {time.perf_counter() - t0:.1f} s]\n  " + "\n  ".join(lines))
    hits = {}
    for name in ("exact", "hnsw"):
        with open(out / f"{name}.csv") as f:
            for row in csv.DictReader(f):
                hits.setdefault(name, {}).setdefault(row["query"], set()).add(row["path"])
    found = [len(hits["hnsw"][k] & v) / len(v) for k, v in hits["exact"].items()]
    print(f"recall@{args.k} of the --faiss hnsw CSV against the exact CSV: {np.mean(found):.4f}")


def main() -> None:
    """Print the fit check, one table per size and the 10^7 model."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--kinds", nargs="+", default=["exact", "flat", "ivf", "ivfpq", "hnsw"])
    p.add_argument("--cli", help="write DIR/big.npz and DIR/q.npz and run msl-kit search on them")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import_faiss().omp_set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.data), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else trained_run(base, args.dim)
        x, y = real_embeddings(ckpt)
        if x.shape[1] != args.dim:
            raise SystemExit(f"the checkpoint embeds to {x.shape[1]}-d, not --dim {args.dim}")
        print(f"checkpoint {ckpt}: {len(x):,} embedded images, {len(np.unique(y))} characters")
        fit = Fit(x, y)
        fidelity(fit, x, y)
        rows = [run_size(fit, n, args, base) for n in args.sizes]
        model_10m(rows[-1], max(args.sizes))


if __name__ == "__main__":
    main()
