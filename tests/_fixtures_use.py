"""Helpers for the embed / search / export tests: a tiny trained run (cached per session) and the
held-out Omniglot alphabets written as a class-folder tree of the original PNG files."""

from __future__ import annotations

import contextlib
import io
import zipfile
from pathlib import Path

from msl_kit import cli, datasets
from msl_kit.datasets import embedded


def tiny_run(base: Path) -> Path:
    """The embedded default trained 5 iterations (~8 s), made once under `base`."""
    run = base / "use_run"
    if not (run / "checkpoint.pt").is_file():
        args = ["train", "--set", "train.iterations=5", "--set", "train.eval_every=0"]
        args += ["--set", "train.threads=1", "--no-baseline", "--out", str(run)]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(args) == 0
    return run


def held_out_tree(base: Path, limit: int | None = None) -> tuple[Path, list[str]]:
    """The test split of the embedded set as base/tree/<alphabet>__<character>/<file>.png
    (bytes as shipped); returns the tree and, per dataset item, its written path."""
    tree = base / "tree"
    ds = datasets.build("omniglot_small", None, "test")
    written = []
    archives: dict[str, zipfile.ZipFile] = {}
    for member, label in zip(ds.paths[:limit], ds.labels[:limit]):
        member = str(member)
        name = member.split("/", 1)[0]
        if name not in archives:
            archives[name] = zipfile.ZipFile(embedded.DATA_DIR / f"{name}.zip")
        folder = tree / ds.classes[label].replace("/", "__")
        path = folder / Path(member).name
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archives[name].read(member))
        written.append(str(path.resolve()))
    for zf in archives.values():
        zf.close()
    return tree, written
