"""Cars196 in the three layouts people have (legacy car_ims.tgz + cars_annos.mat, torchvision's
StanfordCars, the car_data/ mirror): the same DML split from each, at the real counts, and one
clear LayoutError naming the file for each kind of malformed list or .mat file."""

from __future__ import annotations

import io
import warnings
import zipfile
from collections import Counter

import pytest
from _fixtures_data import (
    CARS_NAMES,
    cars_archives,
    cars_images,
    cars_tree,
    cub_members,
    inshop_files,
    mat_bytes,
    sop_members,
    tar_bytes,
    write_tree,
    zip_bytes,
)

import msl_kit.datasets as D
from msl_kit import cli
from msl_kit.datasets.preparation import MARKER

LAYOUTS = ("legacy", "torchvision", "kaggle")


@pytest.fixture(scope="session")
def real_cars(tmp_path_factory):
    """Each layout at the real counts (16,185 4x4 JPEGs) as unpacked by hand, prepared and built
    once (the archives of each layout are tested on small fakes below: extracting 16k files three
    times would add ~10 s). -> {layout: (truth, train, test)}; truth maps image path -> class id."""
    images, out = cars_images(real=True), {}
    for layout in LAYOUTS:
        root = tmp_path_factory.mktemp(layout)
        tree, truth = cars_tree(layout, images)
        write_tree(tree, root / "cars196")
        D.prepare("cars196", root, progress=False)
        out[layout] = (truth, D.build("cars196", root, "train"), D.build("cars196", root, "test"))
    return out


def _class_of(*datasets) -> dict[str, str]:
    """image path -> class name, over the datasets given."""
    return {p: ds.classes[label] for ds in datasets for p, label in zip(ds.paths, ds.labels)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_gives_the_dml_split_at_real_counts(real_cars, layout):
    truth, train, test = real_cars[layout]
    assert (len(train), len(test)) == (8054, 8131)
    assert train.classes == CARS_NAMES[:98] and test.classes == CARS_NAMES[98:]
    # every image, its own class (class ids 1-196 index CARS_NAMES in every layout)
    assert _class_of(train, test) == {p: CARS_NAMES[c - 1] for p, c in truth.items()}


def test_layouts_agree_on_labels_and_counts(real_cars):
    summaries = [
        (train.classes, test.classes, Counter(train.labels.tolist()), Counter(test.labels.tolist()))
        for _, train, test in real_cars.values()
    ]
    assert summaries[0] == summaries[1] == summaries[2]


def test_torchvision_train_and_test_files_of_the_same_name_stay_apart(real_cars):
    truth, train, test = real_cars["torchvision"]
    a, b = "cars_train/00001.jpg", "cars_test/00001.jpg"
    assert truth[a] != truth[b]  # the fixture makes the collision matter
    found = _class_of(train, test)
    assert len(found) == 16185 and found[a] == CARS_NAMES[truth[a] - 1]
    assert found[b] == CARS_NAMES[truth[b] - 1]


# ----------------------------------------------------------------------------- small fakes


def test_copies_that_differ_from_the_published_md5_are_used_with_a_warning(tmp_path):
    files = cars_archives("legacy", cars_tree("legacy", cars_images(real=False))[0], tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        D.prepare("cars196", tmp_path / "data", archive=files, progress=False)
    messages = [str(w.message) for w in caught]
    for name, md5 in (
        ("car_ims.tgz", "d5c8f0aa497503f355e17dc7886c3f14"),
        ("cars_annos.mat", "b407c6086d669747186bd1d764ff9dbc"),
    ):
        assert any(f"differs from the published {name} (md5 {md5})" in m for m in messages)
    (tmp_path / "Stanford_Online_Products.zip").write_bytes(zip_bytes(sop_members()))
    with pytest.warns(
        UserWarning,
        match="differs from the published Stanford_Online_Products.zip "
        r"\(md5 7f73d41a2f44250d4779881525aea32e\)",
    ):
        D.prepare(
            "sop",
            tmp_path / "data",
            archive=tmp_path / "Stanford_Online_Products.zip",
            progress=False,
        )


@pytest.mark.parametrize("layout", ["torchvision", "kaggle"])
def test_new_layouts_from_their_archives_through_the_cli(tmp_path, capsys, layout):
    tree, truth = cars_tree(layout, cars_images(real=False))
    files = cars_archives(layout, tree, tmp_path / "given")
    root = tmp_path / "data"
    assert cli.main(["prepare", "cars196", "--root", str(root), "--archive", *map(str, files)]) == 0
    assert "prepared cars196: 10 images of 5 classes" in capsys.readouterr().out
    train, test = D.build("cars196", root, "train"), D.build("cars196", root, "test")
    assert train.classes == [CARS_NAMES[c - 1] for c in (1, 2, 98)] and len(train) == 6
    assert test.classes == [CARS_NAMES[98], CARS_NAMES[195]] and len(test) == 4
    assert sorted([*train.paths, *test.paths]) == sorted(truth)


def test_torchvision_copy_with_nested_image_folders(tmp_path):
    """Some re-uploads hold cars_train/cars_train/*.jpg; the images are found there."""
    tree, truth = cars_tree("torchvision", cars_images(real=False))
    nested = {(f"{p.split('/')[0]}/{p}" if p in truth else p): b for p, b in tree.items()}
    write_tree(nested, tmp_path / "cars196")
    D.prepare("cars196", tmp_path, progress=False)
    assert len(D.build("cars196", tmp_path, "test")) == 4


def _tree(layout: str) -> dict[str, bytes]:
    return cars_tree(layout, cars_images(real=False))[0]


def _devkit_fields_in_legacy_file() -> dict[str, bytes]:
    tree = _tree("legacy")
    rows = [(1, 1, 3, 3, 1, "000001.jpg")]
    tree["cars_annos.mat"] = mat_bytes(
        ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"], rows, CARS_NAMES
    )
    return tree


def _edit(layout: str, path: str, data: bytes | None) -> dict[str, bytes]:
    tree = _tree(layout)
    if data is None:
        del tree[path]
    else:
        tree[path] = data
    return tree


def _csv_edit(path: str, line: int, text: str) -> dict[str, bytes]:
    tree = _tree("kaggle")
    lines = tree[path].decode().splitlines()
    lines[line - 1] = text
    tree[path] = ("\n".join(lines) + "\n").encode()
    return tree


CARS_BAD = {
    "legacy .mat with the devkit's fields": (
        _devkit_fields_in_legacy_file,
        r"cars_annos.mat: its 'annotations' have fields bbox_x1, .*fname; expected 'annotations' "
        r"\(relative_im_path, class\) and 'class_names'.*fname is the devkit's field",
    ),
    "legacy .mat without class_names": (
        lambda: _edit(
            "legacy",
            "cars_annos.mat",
            mat_bytes(["relative_im_path", "class"], [("car_ims/000001.jpg", 1)]),
        ),
        r"cars_annos.mat has no 'class_names' \(variables: annotations\); expected",
    ),
    "legacy .mat truncated": (
        lambda: _edit("legacy", "cars_annos.mat", _tree("legacy")["cars_annos.mat"][:300]),
        r"cars_annos.mat is not a readable MATLAB file .*expected 'annotations'",
    ),
    "test annotations without classes": (
        lambda: _edit(
            "torchvision",
            "cars_test_annos_withlabels.mat",
            _tree("torchvision")["devkit/cars_test_annos.mat"],
        ),
        r"cars_test_annos_withlabels.mat: its 'annotations' have fields bbox_x1, bbox_y1, "
        r"bbox_x2, bbox_y2, fname; expected 'annotations' \(fname, class\)",
    ),
    "no cars_test_annos_withlabels.mat": (
        lambda: _edit("torchvision", "cars_test_annos_withlabels.mat", None),
        r"no cars_test_annos_withlabels.mat \(the devkit's cars_test_annos.mat has no classes\)",
    ),
    "devkit without cars_meta.mat": (
        lambda: _edit("torchvision", "devkit/cars_meta.mat", None),
        r"devkit has cars_train_annos.mat but no cars_meta.mat",
    ),
    "cars_meta.mat without class_names": (
        lambda: _edit("torchvision", "devkit/cars_meta.mat", mat_bytes(["class"], [(1,)])),
        r"cars_meta.mat has no 'class_names' \(variables: annotations\); expected 'class_names'",
    ),
    "anno csv row with a column missing": (
        lambda: _csv_edit("anno_train.csv", 3, "00003.jpg,1,1,3,3"),
        r"anno_train.csv, line 3: expected 6 columns 'image,x1,y1,x2,y2,class'; got "
        r"'00003.jpg,1,1,3,3'",
    ),
    "anno csv with a non-integer class": (
        lambda: _csv_edit("anno_test.csv", 2, "00002.jpg,1,1,3,3,Audi"),
        r"anno_test.csv: class \(the last column\) must be an integer; got 'Audi'",
    ),
    "names.csv shorter than the classes": (
        lambda: _edit("kaggle", "names.csv", b"Only One Name 2012\n"),
        r"anno_train.csv: class \d+ of .* is not among the 1 classes named in names.csv",
    ),
    "no names.csv": (
        lambda: _edit("kaggle", "names.csv", None),
        r"has no names.csv; expected it beside anno_train.csv",
    ),
    "no annotation file at all": (
        lambda: {"car_ims/000001.jpg": b"x", "devkit/cars_meta.mat": mat_bytes([], [], CARS_NAMES)},
        r"has none of cars_annos.mat \(car_ims.tgz \+ cars_annos.mat\), "
        r"devkit/cars_train_annos.mat \(torchvision's StanfordCars layout\) or anno_train.csv",
    ),
}


@pytest.mark.parametrize("case", list(CARS_BAD))
def test_malformed_cars_files_give_one_line_naming_the_file(tmp_path, case):
    make, pattern = CARS_BAD[case]
    write_tree(make(), tmp_path / "cars196")
    with pytest.raises(D.LayoutError, match=pattern) as err:
        D.prepare("cars196", tmp_path, progress=False)
    message = str(err.value)
    assert "\n" not in message and "kaggle.com/datasets/jutrera" in message  # where to get it
    assert not (tmp_path / "cars196" / MARKER).exists()


def _replace(members: dict[str, bytes], path: str, old: bytes, new: bytes) -> dict[str, bytes]:
    return {**members, path: members[path].replace(old, new, 1)}


def _inshop_bad() -> bytes:
    """One zip: the img/ tree with list_eval_partition.txt beside it, a row with 4 fields."""
    images, partition = inshop_files()
    with zipfile.ZipFile(io.BytesIO(images)) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members["list_eval_partition.txt"] = partition.replace(b"train\n", b"train extra\n", 1)
    return zip_bytes(members)


LIST_BAD = {
    "cub images.txt row": (
        "cub200",
        lambda: tar_bytes(_replace(cub_members(), "CUB_200_2011/images.txt", b"\n2 ", b"\n2 x ")),
        r"images.txt, line 2: expected 'image_id path'; got '2 x ",
    ),
    "cub non-integer class": (
        "cub200",
        lambda: tar_bytes(
            _replace(cub_members(), "CUB_200_2011/image_class_labels.txt", b"\n2 1\n", b"\n2 one\n")
        ),
        r"image_class_labels.txt: class_id must be an integer; got 'one'",
    ),
    "cub class missing from classes.txt": (
        "cub200",
        lambda: tar_bytes(
            _replace(cub_members(), "CUB_200_2011/classes.txt", b"2 002.Laysan_Albatross\n", b"")
        ),
        r"classes.txt: expected a row for class 2; there is none",
    ),
    "sop Ebay_test.txt row": (
        "sop",
        lambda: zip_bytes(
            _replace(
                sop_members(),
                "Stanford_Online_Products/Ebay_test.txt",
                b" 3 toaster_final",
                b" toaster_final",
            )
        ),
        r"Ebay_test.txt, line \d: expected 'image_id class_id super_class_id path'",
    ),
    "inshop partition row": (
        "inshop",
        _inshop_bad,
        r"list_eval_partition.txt, line 3: expected 'image_name item_id evaluation_status'",
    ),
}


@pytest.mark.parametrize("case", list(LIST_BAD))
def test_malformed_list_files_give_one_line_naming_the_file(tmp_path, case):
    name, make, pattern = LIST_BAD[case]
    data = make()
    archive = tmp_path / ("a.zip" if data[:2] == b"PK" else "a.tgz")
    archive.write_bytes(data)
    with pytest.raises(D.LayoutError, match=pattern) as err:
        D.prepare(name, tmp_path / "data", archive=archive, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data").exists()  # what it extracted is gone


def test_folder_csv_with_a_bad_row_names_the_line(tmp_path):
    (tmp_path / "list.csv").write_text("path,label,split\na.png,1\n")
    with pytest.raises(
        D.LayoutError,
        match=r"list.csv, line 2: expected 3 columns "
        r"'path,label,split'; got 'a.png,1'",
    ):
        D.build("folder", tmp_path / "list.csv", "train")
