"""Readers of the three Cars196 layouts in circulation (see `read_cars`).

Built on the readers' shared primitives (records, confined paths, list-file checks).
"""

from __future__ import annotations

import csv
import posixpath
from pathlib import Path

import numpy as np

from msl_kit.datasets.layouts.common import LayoutError, Record, folder_holding, inside, to_int

CARS_TRAIN_CLASSES = 98  # the DML split: classes 1-98 train, 99-196 test

_LEGACY = "'annotations' (relative_im_path, class) and 'class_names', as in cars_annos.mat"
_DEVKIT = "'annotations' (fname, class), as in the devkit's cars_train_annos.mat"


def read_cars(ddir: Path) -> list[Record]:
    """Cars196 from whichever layout the folder holds, detected by its annotation file."""
    for marker, reader in (
        ("cars_annos.mat", _cars_legacy),
        ("cars_train_annos.mat", _cars_devkit),
        ("anno_train.csv", _cars_csv),
    ):
        base = folder_holding(ddir, marker)
        if base is not None:
            return reader(ddir, base)
    raise LayoutError(
        f"{ddir} has none of cars_annos.mat (car_ims.tgz + cars_annos.mat), "
        "devkit/cars_train_annos.mat (torchvision's StanfordCars layout) or "
        "anno_train.csv (the car_data/ mirror); is this Stanford Cars?"
    )


def _car(path: str, cls: int, names: list[str], where: Path, names_from: str) -> Record:
    if not 1 <= cls <= len(names):
        raise LayoutError(
            f"{where}: class {cls} of {path} is not among the {len(names)} classes "
            f"named in {names_from}"
        )
    return Record(path, cls, names[cls - 1], "train" if cls <= CARS_TRAIN_CLASSES else "test")


def _loadmat(
    path: Path, expected: str, names: bool, fields: tuple[str, ...] = ()
) -> tuple[list[str], list[tuple[str, int]]]:
    """(class_names, [(fields[0], class) of each 'annotations' element]) of a MATLAB file, each
    only where asked for; a LayoutError naming the file and `expected` where one is missing."""
    from scipy.io import loadmat  # scikit-learn's dependency; only Cars needs it

    try:  # record arrays: a field is one column, read at once (16k structs in ~0.6 s)
        mat = loadmat(str(path), squeeze_me=True)
    except Exception as err:  # scipy raises ValueError, TypeError, its own MatReadError...
        raise LayoutError(
            f"{path} is not a readable MATLAB file ({err}); expected {expected}; "
            "get a complete copy"
        ) from None
    keys = (["class_names"] if names else []) + (["annotations"] if fields else [])
    for key in keys:
        if key not in mat:
            found = ", ".join(k for k in mat if not k.startswith("__")) or "none"
            raise LayoutError(f"{path} has no '{key}' (variables: {found}); expected {expected}")
    class_names = [str(n) for n in np.atleast_1d(mat["class_names"])] if names else []
    if not fields:
        return class_names, []
    annos = np.atleast_1d(mat["annotations"])
    have = list(annos.dtype.names or ())
    missing = [f for f in fields if f not in have]
    if missing:
        hint = ""
        if "fname" in have and "relative_im_path" in missing:
            hint = " (fname is the devkit's field: keep devkit/ beside cars_train/ and cars_test/)"
        raise LayoutError(
            f"{path}: its 'annotations' have fields {', '.join(have) or 'none'}; "
            f"expected {expected}{hint}"
        )
    try:
        return class_names, [(str(p), int(c)) for p, c in zip(annos[fields[0]], annos["class"])]
    except (TypeError, ValueError) as err:
        raise LayoutError(
            f"{path}: an annotation is malformed ({err}); expected {expected}"
        ) from None


def _cars_legacy(ddir: Path, base: str) -> list[Record]:
    """car_ims.tgz + cars_annos.mat: car_ims/NNNNNN.jpg, one list of all 16,185 images."""
    path = ddir / base / "cars_annos.mat"
    names, annos = _loadmat(path, _LEGACY, names=True, fields=("relative_im_path", "class"))
    return [_car(inside(base, rel), cls, names, path, "its class_names") for rel, cls in annos]


def _cars_devkit(ddir: Path, base: str) -> list[Record]:
    """torchvision's StanfordCars: cars_{train,test}/NNNNN.jpg (the same names in both folders),
    devkit/{cars_meta,cars_train_annos}.mat, cars_test_annos_withlabels.mat."""
    devkit, top = ddir / base, posixpath.dirname(base) or "."
    if not (devkit / "cars_meta.mat").is_file():
        raise LayoutError(
            f"{devkit} has cars_train_annos.mat but no cars_meta.mat (the class "
            "names); unpack the whole car_devkit.tgz"
        )
    names, _ = _loadmat(
        devkit / "cars_meta.mat", "'class_names', as in the devkit's cars_meta.mat", names=True
    )
    withlabels = "cars_test_annos_withlabels.mat"  # torchvision puts it beside devkit/
    test_at = next((d for d in (top, base) if (ddir / d / withlabels).is_file()), None)
    test_at = test_at if test_at is not None else folder_holding(ddir, withlabels)
    if test_at is None:
        raise LayoutError(
            f"{ddir} has the devkit but no cars_test_annos_withlabels.mat (the "
            "devkit's cars_test_annos.mat has no classes); put it beside devkit/"
        )
    out = []
    for split, anno in (
        ("train", devkit / "cars_train_annos.mat"),
        ("test", ddir / test_at / "cars_test_annos_withlabels.mat"),
    ):
        _, annos = _loadmat(anno, _DEVKIT, names=False, fields=("fname", "class"))
        # a Kaggle re-upload nests the folders: cars_train/cars_train/*.jpg
        folders = [inside(top, f"cars_{split}"), inside(top, f"cars_{split}", f"cars_{split}")]
        folder = next(
            (f for f in folders if annos and (ddir / f / annos[0][0]).is_file()), folders[0]
        )
        out += [
            _car(inside(folder, fname), cls, names, anno, "cars_meta.mat") for fname, cls in annos
        ]
    return out


def _csv_rows(path: Path, expected: str) -> list[list[str]]:
    """Comma-separated rows (no header) with as many columns as `expected` names."""
    width = len(expected.split(","))
    if not path.is_file():
        raise LayoutError(f"{path.parent} has no {path.name}; expected it beside anno_train.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(n, r) for n, r in enumerate(csv.reader(f), start=1) if any(c.strip() for c in r)]
    for number, row in rows:
        if len(row) != width:
            raise LayoutError(
                f"{path}, line {number}: expected {width} columns '{expected}'; got "
                f"{','.join(row)!r}"
            )
    return [[c.strip() for c in row] for _, row in rows]


def _cars_csv(ddir: Path, base: str) -> list[Record]:
    """The car_data mirror: car_data/car_data/{train,test}/<class name>/NNNNN.jpg with
    anno_{train,test}.csv (image,x1,y1,x2,y2,class; no header) and names.csv beside car_data/."""
    names = [row[0] for row in _csv_rows(ddir / base / "names.csv", "class name")]
    tops = [inside(base, "car_data", "car_data"), inside(base, "car_data"), base or "."]
    images = next((t for t in tops if (ddir / t / "train").is_dir()), tops[0])
    out = []
    for split in ("train", "test"):
        anno = ddir / base / f"anno_{split}.csv"
        found = {
            p.name: p.relative_to(ddir).as_posix() for p in (ddir / images / split).glob("*/*")
        }
        for fname, *_, cls in _csv_rows(anno, "image,x1,y1,x2,y2,class"):
            cls_id = to_int(cls, anno, "class (the last column)")
            # the folder is named after the class, '/' made '-' (Ram C/V -> Ram C-V): where a file
            # is missing, that is the path the error names
            name = names[cls_id - 1].replace("/", "-") if 1 <= cls_id <= len(names) else "?"
            rel = found.get(fname) or inside(images, split, name, fname)
            out.append(_car(rel, cls_id, names, anno, "names.csv"))
    return out
