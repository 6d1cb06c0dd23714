"""Readers of the official file layouts of CUB-200-2011, SOP, In-Shop and Omniglot, and of a
folder of your own images: list files -> (path, class, split) records."""

from __future__ import annotations

import csv
import posixpath
from pathlib import Path

from msl_kit.datasets.layouts.common import (
    IMAGE_EXTENSIONS,
    LayoutError,
    Record,
    find,
    inside,
    read_rows,
    to_int,
)


def read_cub(ddir: Path) -> list[Record]:
    base = ddir / find(ddir, "images.txt")
    images = dict(read_rows(base / "images.txt", "image_id path"))
    labels = dict(read_rows(base / "image_class_labels.txt", "image_id class_id"))
    names = dict(read_rows(base / "classes.txt", "class_id name"))
    out = []
    rel_base = base.relative_to(ddir).as_posix()
    for image_id, rel in images.items():
        if image_id not in labels:
            raise LayoutError(
                f"{base / 'image_class_labels.txt'}: expected a row for image "
                f"{image_id} of images.txt; there is none"
            )
        cls = to_int(labels[image_id], base / "image_class_labels.txt", "class_id")
        if str(cls) not in names:
            raise LayoutError(
                f"{base / 'classes.txt'}: expected a row for class {cls}; there is none"
            )
        split = "train" if cls <= 100 else "test"
        out.append(Record(inside(rel_base, "images", rel), cls, names[str(cls)], split))
    return out


# ----------------------------------------------------------------------------- Cars196
# Three layouts in circulation, one DML split: classes 1-98 train, 99-196 test (8,054 / 8,131),
# whatever split a file calls train or test (that is the classification split). Class ids are
# the 1-based ids every layout shares (cars_annos.mat = cars_meta.mat = names.csv order).
def read_sop(ddir: Path) -> list[Record]:
    base = find(ddir, "Ebay_train.txt")
    out = []
    for split in ("train", "test"):  # image_id class_id super_class_id path, after a header
        path = ddir / base / f"Ebay_{split}.txt"
        for _, cls, _, rel in read_rows(path, "image_id class_id super_class_id path", skip=1):
            out.append(Record(inside(base, rel), to_int(cls, path, "class_id"), cls, split))
    return out


def read_inshop(ddir: Path) -> list[Record]:
    base = find(ddir, "list_eval_partition.txt")
    # a count line, then a header line
    rows = read_rows(
        ddir / base / "list_eval_partition.txt", "image_name item_id evaluation_status", skip=2
    )
    # the images (img/...) sit beside the list file, above it, or in an Img/ folder
    parent = posixpath.dirname(base) or "."
    candidates = [base, parent, inside(parent, "Img")]
    image_base = next((c for c in candidates if rows and (ddir / c / rows[0][0]).is_file()), base)
    return [Record(inside(image_base, rel), item, item, split) for rel, item, split in rows]


def read_omniglot(ddir: Path) -> list[Record]:
    """Every images_background*/images_evaluation* folder of a prepared Omniglot."""
    tops = [p.name for p in ddir.iterdir() if p.is_dir() and p.name.startswith(_OMNIGLOT_TOPS)]
    paths = [
        png.relative_to(ddir).as_posix() for top in tops for png in (ddir / top).glob("*/*/*.png")
    ]
    return omniglot_records(paths, where=str(ddir))


_OMNIGLOT_TOPS = ("images_background", "images_evaluation")


def omniglot_records(paths: list[str], where: str = "the archives") -> list[Record]:
    """Omniglot images ("top/alphabet/character/file.png") united by (alphabet, character).

    A character present under several tops is taken from the first in sorted order. Background
    alphabets train and evaluation alphabets test; where only one kind is present (e.g. the two
    small background zips), alphabets are sorted by name and every second one (positions 1, 3,
    5...) is held out as test.
    """
    seen: dict[tuple[str, str], tuple[str, str]] = {}  # (alphabet, character) -> (top, kind)
    files: dict[tuple[str, str, str], list[str]] = {}
    for path in sorted(paths):
        parts = path.split("/")
        if len(parts) != 4 or not parts[0].startswith(_OMNIGLOT_TOPS):
            continue
        top, alphabet, char, name = parts
        kind = "train" if top.startswith("images_background") else "test"
        seen.setdefault((alphabet, char), (top, kind))
        files.setdefault((top, alphabet, char), []).append(name)
    if not seen:
        raise LayoutError(
            f"{where} has no images_background*/ or images_evaluation*/ folder; is this Omniglot?"
        )
    if len({kind for _, kind in seen.values()}) == 1:
        alphabets = sorted({alphabet for alphabet, _ in seen})
        test = set(alphabets[1::2])
        seen = {k: (top, "test" if k[0] in test else "train") for k, (top, _) in seen.items()}
    out = []
    for (alphabet, char), (top, split) in sorted(seen.items()):
        for name in files[(top, alphabet, char)]:
            out.append(
                Record(
                    f"{top}/{alphabet}/{char}/{name}", (alphabet, char), f"{alphabet}/{char}", split
                )
            )
    return out


def read_folder(root: Path) -> tuple[Path, list[Record]]:
    """root/<split>/<class>/**/image, or a CSV file of path,label,split (paths relative to it)."""
    if root.is_file():
        with open(root, newline="", encoding="utf-8") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][1]] == ["path", "label", "split"]:
            rows = rows[1:]
        bad = [(n, r) for n, r in rows if len(r) != 3]
        if bad:
            raise LayoutError(
                f"{root}, line {bad[0][0]}: expected 3 columns 'path,label,split'; "
                f"got {','.join(bad[0][1])!r}"
            )
        out = [
            Record(inside(p.strip()), natural(lab.strip()), lab.strip(), s.strip())
            for _, (p, lab, s) in rows
        ]
        return root.parent, out
    if not root.is_dir():
        raise LayoutError(f"{root} is neither a folder of <split>/<class>/ images nor a CSV file")
    out = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for img in sorted(class_dir.rglob("*")):
                if img.suffix.lower() in IMAGE_EXTENSIONS and img.is_file():
                    rel = img.relative_to(root).as_posix()
                    cls = class_dir.name
                    out.append(Record(rel, natural(cls), cls, split_dir.name))
    if not out:
        raise LayoutError(
            f"{root} holds no images as <split>/<class>/<image> (e.g. train/cat/1.jpg)"
        )
    return root, out


def natural(label: str) -> tuple:
    """Sort key of a class name: numbers in numeric order first, then names."""
    return (0, int(label), "") if label.isdigit() else (1, 0, label)
