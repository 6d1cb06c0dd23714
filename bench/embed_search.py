"""Embed throughput against evaluate's path, and exact vs faiss search on a large gallery.

    python bench/embed_search.py [--checkpoint RUN_OR_FILE] [--gallery 100000] [--queries 1000]
                                 [--dim 512] [--k 10] [--threads 2] [--repeats 3]

1. The held-out Omniglot-small alphabets (2,240 images) written as a class-folder tree; images/s
   of `embed` (folder -> FILE.npz, chunks on disk) against `msl-kit evaluate`'s extraction
   (`recipe.eval_data` + `evaluation.extract` on the embedded split), same checkpoint, same
   threads, best of --repeats. Without --checkpoint a 512-d default run (150 iterations) is
   trained first (~40 s).
2. A gallery of --gallery vectors made from the trained model's own embeddings of all 4,840
   embedded images (each repeated with small Gaussian jitter, renormalised: the clustered
   shape of real embeddings, not isotropic noise), searched by --queries of them: exact
   `metrics.knn` (what `msl-kit search` does) against faiss IndexFlatIP (build and search
   timed apart), top-k agreement reported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from _fixtures_use import held_out_tree  # noqa: E402

from msl_kit import cli, datasets, metrics
from msl_kit.train import checkpoint, evaluation, recipe
from msl_kit.use.embedding import embed


def best_of(repeats: int, fn) -> float:
    """The fastest of `repeats` wall times of fn() (first call included: nothing is cached)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def trained_run(base: Path, dim: int) -> Path:
    run = base / "run"
    args = ["train", "--set", "train.eval_every=0"]  # the default 150 iterations: a trained model
    args += ["--set", f"model.embedding_dim={dim}", "--no-baseline", "--out", str(run)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(args) == 0
    return run


def throughput(ckpt: Path, base: Path, repeats: int) -> None:
    tree, _ = held_out_tree(base)
    model, cfg = checkpoint.load_model(ckpt)
    query, _ = recipe.eval_data(cfg)
    opts, dev = recipe.eval_options(cfg), torch.device("cpu")
    n = len(query)
    t_eval = best_of(repeats, lambda: evaluation.extract(model, query, dev, opts))
    outs = iter(range(repeats))
    t_embed = best_of(
        repeats, lambda: embed(ckpt, tree, base / f"e{next(outs)}.npz", progress=False)
    )
    print(f"embed throughput, {n} held-out Omniglot images, {cfg.model.backbone}:")
    print(f"  evaluate's extraction  {n / t_eval:8.0f} images/s  ({t_eval:.2f} s)")
    print(f"  embed (folder -> npz)  {n / t_embed:8.0f} images/s  ({t_embed:.2f} s)")
    print(f"  ratio embed / evaluate {t_eval / t_embed:8.2f}")


def gallery_vectors(ckpt: Path, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """n unit vectors around the model's embeddings of every embedded image."""
    model, cfg = checkpoint.load_model(ckpt)
    tf = recipe.preprocessing(cfg)
    from msl_kit.datasets import transforms

    split = [
        datasets.build("omniglot_small", None, s, transforms.build_transform(tf, train=False))
        for s in ("train", "test")
    ]
    base = torch.cat([evaluation.extract(model, ds, torch.device("cpu"))[0] for ds in split])
    base = base.numpy()
    if base.shape[1] != dim:
        raise SystemExit(f"the checkpoint embeds to {base.shape[1]}-d, not --dim {dim}")
    rng = np.random.default_rng(seed)
    x = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.02, (n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def search_times(x: np.ndarray, n_queries: int, k: int, repeats: int) -> None:
    import faiss

    q = x[:: max(1, len(x) // n_queries)][:n_queries].copy()
    exact = {}
    t_exact = best_of(repeats, lambda: exact.update(r=metrics.knn(q, k, x, exclude_self=False)))
    index = faiss.IndexFlatIP(x.shape[1])
    t_build = best_of(1, lambda: index.add(x))
    found = {}
    t_faiss = best_of(repeats, lambda: found.update(r=index.search(q, k)))
    agree = np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(exact["r"][1].numpy(), found["r"][1])]
    )
    print(f"search, {len(q)} queries x {len(x)} x {x.shape[1]} gallery, k={k}:")
    print(f"  exact metrics.knn      {t_exact:8.2f} s")
    print(f"  faiss IndexFlatIP      {t_faiss:8.2f} s  (+ {t_build:.2f} s to build)")
    print(f"  top-{k} sets agree      {100 * agree:8.2f} %")


def main() -> None:
    """Print the two comparisons."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint")
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else trained_run(base, args.dim)
        print(f"checkpoint {ckpt}, {args.threads} thread(s), best of {args.repeats}")
        throughput(ckpt, base, args.repeats)
        search_times(
            gallery_vectors(ckpt, args.gallery, args.dim), args.queries, args.k, args.repeats
        )


if __name__ == "__main__":
    main()
