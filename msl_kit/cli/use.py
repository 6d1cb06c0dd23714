"""`msl-kit embed | search | export`: use a trained model on your own images (thin shell)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from msl_kit.cli.run import add_plugin_option


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed a folder / CSV / dataset split into FILE.npz (resumable)."""
    from msl_kit.use.embedding import embed

    if (args.images is None) == (args.dataset is None):
        return _fail("give either --images PATH or --dataset NAME (with --split)")
    options = dict(dataset=args.dataset, root=args.root, split=args.split)
    options.update(batch_size=args.batch_size, workers=args.workers, device=args.device)
    if args.chunk_size is not None:
        options["chunk_size"] = args.chunk_size
    try:
        emb = embed(args.checkpoint, args.images, args.out, **options)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; the finished pieces are kept in {args.out}.part/: "
            "rerun the same command to embed only what is missing",
            file=sys.stderr,
        )
        return 130
    if emb.skipped:
        from msl_kit.files.tree import printable

        first = ", ".join(printable(Path(p).name) for p in emb.skipped[:3])
        print(
            f"skipped {len(emb.skipped)} file(s) that are not readable images or links that "
            f"are not followed (first: {first}); the file's `skipped` and `skipped_reasons` "
            "list them with why",
            file=sys.stderr,
        )
    labels = f", {len(emb.classes)} classes" if emb.labels is not None else ", no labels"
    print(f"{len(emb)} images -> {emb.dim}-d vectors{labels}: {args.out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Top-k gallery images of each query; table, CSV and grid."""
    from msl_kit.use import retrieval as use_search
    from msl_kit.use.ann.spec import KNOBS, IndexSpec, import_faiss
    from msl_kit.use.index import Embeddings
    from msl_kit.use.outputs import check_replaceable

    for flag, value, low in (("-k", args.k, 1), ("--grid-queries", args.grid_queries, 1)):
        if value < low:
            return _fail(f"{flag} must be at least {low}, got {value}")
    if args.show < -1:
        return _fail(f"--show must be -1 (every query), 0 (none) or more, got {args.show}")
    knobs = {name: getattr(args, name) for name in KNOBS}
    given = [f"--{n.replace('_', '-')}" for n, v in knobs.items() if v is not None]
    if given and not args.faiss:
        return _fail(f"{given[0]} tunes a faiss index: add --faiss ivf, ivfpq or hnsw")
    spec = IndexSpec(args.faiss, **knobs) if args.faiss else None  # bad values: one line now
    if spec is not None:
        import_faiss()
    if args.out:  # every output checked before any work: nothing replaced that is not ours
        check_replaceable(args.out, "csv")
    if args.grid:
        check_replaceable(args.grid, "grid", "--grid")
    gallery = Embeddings.load(args.index)
    query = use_search.load_query(args.query, gallery, args.checkpoint, progress=True)
    backend, what = None, "exact: metrics.knn"
    if spec is not None:
        backend = use_search.faiss_backend(args.index, gallery, spec, args.k, log=_note)
        what = f"faiss {backend.kind}"
        what += f", {backend.knob} {backend.search_value}" if backend.knob else ""
    hits, seconds = timed_search(gallery, query, args.k, not args.keep_self, backend)
    _note(
        f"searched {len(hits.scores):,} queries over {len(gallery):,} x {gallery.dim} in "
        f"{seconds[0]:.3f} s, {seconds[1]:.3f} s of it the kNN ({what})"
    )
    more = f"all in {args.out}" if args.out else "--show -1 prints them, --out FILE.csv keeps them"
    print(use_search.table(hits, None if args.show < 0 else args.show, more))
    r1 = hits.recall_at_1()
    if r1 is not None:
        print(f"R@1 {100 * r1:.1f}% over {len(hits.scores)} labelled queries (top hit same class)")
    if args.out:
        use_search.write_csv(hits, args.out)
        print(f"results written to {args.out}")
    if args.grid:
        from msl_kit.viz.retrieval import hits_grid

        use_search.write_grid(hits_grid(hits, n_queries=args.grid_queries), args.grid)
        print(f"grid written to {args.grid}")
    return 0


def _note(line: str) -> None:
    print(line, file=sys.stderr)


def timed_search(gallery: Any, query: Any, k: int, exclude_self: bool, backend: Any) -> tuple:
    """`gallery.search` with its wall time and the time of the kNN itself (exact or faiss)."""
    from msl_kit.use.index import exact_backend

    inner = backend or exact_backend(gallery.embeddings)
    knn_seconds = []

    def knn(q: Any, n: int) -> Any:
        t0 = time.perf_counter()
        out = inner(q, n)
        knn_seconds.append(time.perf_counter() - t0)
        return out

    t0 = time.perf_counter()
    hits = gallery.search(query, k, exclude_self=exclude_self, backend=knn)
    return hits, (time.perf_counter() - t0, sum(knn_seconds))


def cmd_export(args: argparse.Namespace) -> int:
    """The module (.pt2: torch.export, .pt: TorchScript), its description (+ ONNX)."""
    import warnings

    from msl_kit.use.exporting import export

    with warnings.catch_warnings(record=True) as seen:  # shown as lines, not source excerpts
        info = export(args.checkpoint, args.out, onnx=True if args.onnx else None)
    for w in seen:
        print(f"warning: {w.message}", file=sys.stderr)
    folder = Path(args.out).parent
    names = [info["module"], info["description"], info["onnx"]]
    print(f"wrote {', '.join(str(folder / name) for name in names if name)}")
    print(f"feed it: {info['how']}")
    return 0


def add_use_commands(sub: Any) -> None:
    """Register `embed`, `search` and `export` on msl-kit's subcommand parser."""
    p = sub.add_parser("embed", help="turn a folder of images into vectors (FILE.npz)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--images", help="a folder (class sub-folders = labels), a CSV path[,label]")
    p.add_argument("--dataset", help="or a prepared dataset's split (with --root, --split)")
    p.add_argument("--root", help="the folder --dataset was prepared in")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="FILE.npz (rerun after an interrupt to resume)")
    p.add_argument("--batch-size", type=int, help=">= 1 (default: the run's eval.batch_size)")
    p.add_argument("--workers", type=int, help="loader processes, 0: none (default: the run's)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the run's)")
    p.add_argument("--chunk-size", type=int, help="images per resumable piece, >= 1 (4096)")
    add_plugin_option(p)
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("search", help="the k nearest gallery images of each query")
    p.add_argument("--index", required=True, help="FILE.npz made by msl-kit embed")
    p.add_argument("--query", required=True, help="an image, folder, CSV, or embeddings file")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--checkpoint", help="embed the query with this (default: the index's)")
    p.add_argument("--out", help="write every row to this FILE.csv")
    p.add_argument("--grid", help="draw queries beside their top k into this FILE.png")
    p.add_argument("--grid-queries", type=int, default=6, help="queries in the grid (>= 1)")
    p.add_argument("--show", type=int, default=5, help="queries printed (-1: all)")
    p.add_argument(
        "--faiss",
        nargs="?",
        const="flat",
        metavar="KIND",
        help="search a faiss index, kept as FILE.KIND.faiss: flat (the default, exact), ivf, "
        "ivfpq or hnsw (approximate; the recall they cost is measured and printed)",
    )
    p.add_argument("--nlist", type=int, help="ivf/ivfpq: inverted lists (default 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, help="ivf/ivfpq: lists visited per query (tuned)")
    p.add_argument("--pq-bytes", type=int, help="ivfpq: bytes per vector (default D / 4)")
    p.add_argument("--hnsw-m", type=int, help="hnsw: links per node (default 32)")
    p.add_argument("--ef-search", type=int, help="hnsw: candidates per query (tuned)")
    p.add_argument(
        "--keep-self", action="store_true", help="let a query that is in the gallery find itself"
    )
    add_plugin_option(p)
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("export", help="torch.export / TorchScript (+ ONNX) module, uint8 in")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument(
        "--out",
        required=True,
        help="NAME.pt2 (torch.export) or NAME.pt (TorchScript); NAME.json (and NAME.onnx) beside",
    )
    p.add_argument("--onnx", action="store_true", help="fail if ONNX cannot be written")
    add_plugin_option(p)
    p.set_defaults(func=cmd_export)
