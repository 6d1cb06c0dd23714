"""prepare / build on fixture archives in each dataset's official layout, served over HTTP on
127.0.0.1 or given as local archives: splits, labels, idempotence, repair, confinement."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from fake_data import (
    CARS_CLASSES,
    CUB_CLASSES,
    INSHOP,
    SOP_TEST,
    SOP_TRAIN,
    cars_files,
    cub_members,
    inshop_files,
    omniglot_members,
    serve,
    sop_members,
    tar_bytes,
    zip_bytes,
)
from sklearn.datasets import load_digits

import msl_kit.datasets as D
from msl_kit.datasets.preparation import MARKER
from msl_kit.datasets.transforms import CorruptImageError, build_transform
from msl_kit.files.archives import TMP_MARK, UnsafeArchiveError
from msl_kit.files.download import ChecksumError
from msl_kit.preprocessing import Preprocessing

CUB_TGZ = tar_bytes(cub_members())
CUB_MD5 = hashlib.md5(CUB_TGZ).hexdigest()


def _contiguous(ds) -> None:
    assert ds.labels.dtype == np.int64 and len(ds.labels) == len(ds)
    assert sorted(set(ds.labels.tolist())) == list(range(len(ds.classes)))


def _official(monkeypatch, name: str, *files: D.RemoteFile) -> None:
    """Point the registry's official URLs at the local server."""
    monkeypatch.setitem(D.REGISTRY, name, dataclasses.replace(D.REGISTRY[name], files=files))


# ----------------------------------------------------------------------------- registry


def test_registry_carries_what_prepare_list_shows():
    names = [d.name for d in D.list_datasets()]
    assert names == [
        "digits",
        "omniglot",
        "omniglot_small",
        "cub200",
        "cars196",
        "sop",
        "inshop",
        "folder",
    ]
    for d in D.list_datasets():
        assert d.size and d.licence and d.source and d.description, d.name
        assert d.query_gallery == (d.name == "inshop")
    cub = D.info("cub200")
    assert cub.url == "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
    assert cub.files[0].md5 == "97eceeb196236b17998738112f37df78"
    assert D.info("omniglot").files[0].md5 == "68d2efa1b9178cc56df9314c21c6e718"
    assert D.info("sop").url == ""  # no reliable host: bring your own copy


@pytest.mark.parametrize(
    "call",
    [
        lambda: D.info("cub"),
        lambda: D.build("mnist", ".", "train"),
        lambda: D.prepare("imagenet", "."),
    ],
)
def test_unknown_names_list_the_valid_ones(call):
    with pytest.raises(
        ValueError,
        match="unknown dataset.*digits, omniglot, omniglot_small, "
        "cub200, cars196, sop, inshop, folder",
    ):
        call()


# ----------------------------------------------------------------------------- digits


def test_digits_are_8x8_grey_images_split_0_4_and_5_9(capsys):
    raw = load_digits()
    train, test = D.build("digits", None, "train"), D.build("digits", "ignored", "test")
    assert train.classes == ["0", "1", "2", "3", "4"] and test.classes == ["5", "6", "7", "8", "9"]
    assert len(train) == int((raw.target < 5).sum()) and len(test) == int((raw.target >= 5).sum())
    _contiguous(train)
    _contiguous(test)
    first_test = int(np.flatnonzero(raw.target >= 5)[0])
    image, label, index = test[0]
    assert image.mode == "L" and image.size == (8, 8) and index == 0
    assert label == raw.target[first_test] - 5
    expected = np.round(raw.images[first_test] * 255 / 16).astype(np.uint8)
    assert np.array_equal(np.asarray(image), expected)
    assert test[-1][2] == len(test) - 1
    D.prepare("digits", None)
    assert "nothing to prepare" in capsys.readouterr().out


def test_digits_read_without_importing_scikit_learn_equal_load_digits():
    """Every digits image and label, read from scikit-learn's CSV without importing it (1.5 s of
    CPU saved in every process that trains on digits), equals what load_digits() gives."""
    from msl_kit.datasets import digits

    assert digits._shipped_csv() is not None  # the fast path is the one taken here
    images, target = digits._digits()
    raw = load_digits()
    np.testing.assert_array_equal(target, raw.target)
    np.testing.assert_array_equal(images, np.round(raw.images * 255 / 16).astype(np.uint8))


def test_val_is_a_seeded_class_disjoint_share_of_train():
    full = D.build("digits", None, "train")
    splits = {}
    for seed in range(6):
        tr = D.build("digits", None, "train", val_fraction=0.4, seed=seed)
        va = D.build("digits", None, "val", val_fraction=0.4, seed=seed)
        assert len(va.classes) == 2 and len(tr.classes) == 3
        assert not set(tr.classes) & set(va.classes)
        assert len(tr) + len(va) == len(full)
        _contiguous(tr)
        _contiguous(va)
        splits[seed] = tuple(va.classes)
    assert splits[0] == tuple(D.build("digits", None, "val", val_fraction=0.4, seed=0).classes)
    assert len(set(splits.values())) > 1  # the seed matters
    with pytest.raises(ValueError, match="val_fraction"):
        D.build("digits", None, "val")
    test = D.build("digits", None, "test")
    assert len(D.build("digits", None, "test", val_fraction=0.4)) == len(test)


# ----------------------------------------------------------------------------- CUB over HTTP


def test_cub_from_the_official_url_with_a_dead_mirror(tmp_path, monkeypatch, capsys):
    with serve({"CUB_200_2011.tgz": CUB_TGZ}) as srv:
        _official(
            monkeypatch,
            "cub200",
            D.RemoteFile(
                "CUB_200_2011.tgz",
                CUB_MD5,
                (srv.url("gone/CUB_200_2011.tgz"), srv.url("CUB_200_2011.tgz")),
            ),
        )
        ddir = D.prepare("cub200", tmp_path, progress=False)
        assert ddir == tmp_path / "cub200" and (ddir / "CUB_200_2011" / "images.txt").is_file()
        assert (ddir / "attributes.txt").is_file()
        assert json.loads((ddir / MARKER).read_text())["images"] == 15
        requests, marker_time = len(srv.requests), (ddir / MARKER).stat().st_mtime_ns
        capsys.readouterr()
        assert D.prepare("cub200", tmp_path, progress=False) == ddir
        assert "already prepared" in capsys.readouterr().out
        assert len(srv.requests) == requests and (ddir / MARKER).stat().st_mtime_ns == marker_time
    train, test = D.build("cub200", tmp_path, "train"), D.build("cub200", tmp_path, "test")
    assert train.classes == [CUB_CLASSES[c] for c in (1, 2, 100)] and len(train) == 9
    assert test.classes == [CUB_CLASSES[c] for c in (101, 200)] and len(test) == 6
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    image, label, index = test[4]
    assert image.mode == "RGB" and label == 1 and index == 4
    assert len(D.build("cub200", ddir, "test")) == 6  # root may also be the dataset folder itself


def test_wrong_checksum_leaves_nothing_behind(tmp_path, monkeypatch):
    with serve({"CUB_200_2011.tgz": CUB_TGZ}) as srv:
        _official(
            monkeypatch,
            "cub200",
            D.RemoteFile("CUB_200_2011.tgz", "f" * 32, (srv.url("CUB_200_2011.tgz"),)),
        )
        with pytest.raises(ChecksumError, match="expected f{32}"):
            D.prepare("cub200", tmp_path, progress=False)
    leftovers = [p for p in tmp_path.rglob("*") if not p.is_dir()]
    assert leftovers == []
    with pytest.raises(D.LayoutError, match="msl-kit prepare cub200"):
        D.build("cub200", tmp_path, "train")


def test_interrupted_download_resumes_on_the_next_prepare(tmp_path, monkeypatch):
    with serve({"CUB_200_2011.tgz": CUB_TGZ}) as srv:
        _official(
            monkeypatch,
            "cub200",
            D.RemoteFile("CUB_200_2011.tgz", CUB_MD5, (srv.url("CUB_200_2011.tgz"),)),
        )
        part = tmp_path / "cub200" / "downloads" / "CUB_200_2011.tgz.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(CUB_TGZ[:1000])
        D.prepare("cub200", tmp_path, progress=False)
    assert srv.requests == [("CUB_200_2011.tgz", "bytes=1000-")]
    assert len(D.build("cub200", tmp_path, "train")) == 9


def test_half_prepared_root_is_detected_and_repaired(tmp_path, monkeypatch, capsys):
    with serve({"CUB_200_2011.tgz": CUB_TGZ}) as srv:
        _official(
            monkeypatch,
            "cub200",
            D.RemoteFile("CUB_200_2011.tgz", CUB_MD5, (srv.url("CUB_200_2011.tgz"),)),
        )
        ddir = D.prepare("cub200", tmp_path, progress=False)
        # a run killed mid-extraction: no marker, a missing image, a temp folder lying about
        (ddir / MARKER).unlink()
        victim = next((ddir / "CUB_200_2011" / "images").rglob("*.jpg"))
        victim.unlink()
        (tmp_path / f".cub200{TMP_MARK}abc").mkdir()
        (ddir / f".classes.txt{TMP_MARK}").write_text("half a copy")
        with pytest.raises(D.LayoutError, match="not prepared"):
            D.build("cub200", tmp_path, "train")
        capsys.readouterr()
        D.prepare("cub200", tmp_path, progress=False)
        assert "incomplete preparation" in capsys.readouterr().out
        assert len(srv.requests) == 1  # the verified download was reused, not fetched again
    assert victim.is_file() and (ddir / MARKER).is_file()
    assert not list(tmp_path.glob(f".*{TMP_MARK}*")) and not list(ddir.glob(f".*{TMP_MARK}*"))
    assert len(D.build("cub200", tmp_path, "train")) == 9


def test_list_file_paths_cannot_leave_the_dataset(tmp_path):
    evil = tmp_path / "listed.tgz"
    evil.write_bytes(tar_bytes(cub_members(bad_line="../../../../etc/passwd")))
    with pytest.raises(D.LayoutError, match="outside the dataset folder"):
        D.prepare("cub200", tmp_path / "data", archive=evil, progress=False)
    assert not (tmp_path / "data" / "cub200" / MARKER).exists()


def test_malicious_archive_is_refused_by_prepare(tmp_path):
    evil = tmp_path / "evil.tgz"
    evil.write_bytes(tar_bytes({"CUB_200_2011/images.txt": b"", "../../escaped.txt": b"x"}))
    with pytest.raises(UnsafeArchiveError):
        D.prepare("cub200", tmp_path / "data", archive=evil, progress=False)
    assert not (tmp_path / "escaped.txt").exists() and not list((tmp_path / "data").rglob("*.txt"))


def test_corrupt_images_raise_naming_the_file_or_are_skipped(tmp_path):
    (tmp_path / "CUB_200_2011.tgz").write_bytes(CUB_TGZ)
    with pytest.warns(UserWarning, match="differs from the published CUB_200_2011.tgz"):
        ddir = D.prepare("cub200", tmp_path, archive=tmp_path / "CUB_200_2011.tgz", progress=False)
    class_two = sorted((ddir / "CUB_200_2011" / "images" / CUB_CLASSES[2]).iterdir())
    for path in class_two:  # every image of class 2 unreadable: that class must vanish
        path.write_bytes(path.read_bytes()[:100])
    train = D.build("cub200", tmp_path, "train")
    with pytest.raises(CorruptImageError, match=class_two[0].name):
        train[3]
    with pytest.warns(RuntimeWarning, match=r"skipped 3 unreadable image\(s\) of 9"):
        kept = D.build("cub200", tmp_path, "train", skip_corrupt=True)
    assert len(kept) == 6 and kept.classes == [CUB_CLASSES[1], CUB_CLASSES[100]]
    _contiguous(kept)
    assert all(kept[i][0].size == (24, 20) for i in range(len(kept)))


def test_loader_with_workers_yields_batches_and_indices(tmp_path):
    (tmp_path / "a.tgz").write_bytes(CUB_TGZ)
    D.prepare("cub200", tmp_path, archive=tmp_path / "a.tgz", progress=False)
    spec = Preprocessing(
        color="BGR",
        value_range=255.0,
        mean=(104.0, 117.0, 128.0),
        std=(1.0, 1.0, 1.0),
        input_size=32,
        resize_size=36,
    )
    ds = D.build("cub200", tmp_path, "train", build_transform(spec, train=True))
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2))
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (9, 3, 32, 32)
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(9))
    assert torch.cat([b[1] for b in batches]).tolist() == ds.labels.tolist()


# ----------------------------------------------------------------------------- Cars, SOP, In-Shop


@pytest.mark.parametrize("name", ["cars196", "sop", "inshop"])
def test_manual_datasets_say_where_to_get_the_files(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=f"{D.info(name).source.split()[0]}.*--archive"):
        D.prepare(name, tmp_path, progress=False)


def test_cars_from_car_ims_and_cars_annos_mat(tmp_path, capsys):
    files = cars_files(tmp_path / "given")
    ddir = D.prepare("cars196", tmp_path / "data", archive=files, progress=False)
    train, test = (D.build("cars196", tmp_path / "data", s) for s in ("train", "test"))
    assert train.classes == [f"Maker Model {c} 2012" for c in CARS_CLASSES if c <= 98]
    assert len(train) == 6
    assert test.classes == ["Maker Model 99 2012", "Maker Model 196 2012"] and len(test) == 4
    _contiguous(train)
    assert test[3][0].size == (30, 20)
    # the marker alone lost (killed just before it was written): verified in place, no archive
    # needed
    (ddir / MARKER).unlink()
    capsys.readouterr()
    D.prepare("cars196", tmp_path / "data", progress=False)
    assert "prepared cars196: 10 images" in capsys.readouterr().out
    (ddir / MARKER).unlink()
    (ddir / "car_ims" / "000001.jpg").unlink()
    with pytest.raises(D.LayoutError, match="(?s)missing.*--archive"):
        D.prepare("cars196", tmp_path / "data", progress=False)


@pytest.mark.parametrize(
    "path", ["mirror/Stanford_Online_Products.zip", "drive/uc?export=download&id=x"]
)
def test_sop_from_a_user_url(tmp_path, path):
    served = path.split("?")[0]  # an archive is recognised by its content, not its name
    with serve({served: zip_bytes(sop_members())}) as srv:
        D.prepare("sop", tmp_path, url=srv.url(path), progress=False)
    train, test = D.build("sop", tmp_path, "train"), D.build("sop", tmp_path, "test")
    assert train.classes == [str(c) for c in SOP_TRAIN] and len(train) == 2 * len(SOP_TRAIN)
    assert test.classes == [str(c) for c in SOP_TEST] and test.labels.tolist() == [0, 0, 1, 1]
    assert (tmp_path / "sop" / "downloads" / served.split("/")[-1]).is_file()


def test_inshop_query_and_gallery_share_labels(tmp_path):
    img_zip, partition = inshop_files()
    with serve({"img.zip": img_zip, "list_eval_partition.txt": partition}) as srv:
        D.prepare(
            "inshop",
            tmp_path,
            url=[srv.url("img.zip"), srv.url("list_eval_partition.txt")],
            progress=False,
        )
    sets = {s: D.build("inshop", tmp_path, s) for s in ("train", "query", "gallery")}
    for split, ds in sets.items():
        expected = {item: sum(s == split for s in splits) for item, splits in INSHOP.items()}
        assert len(ds) == sum(expected.values()), split
        counts = {c: int((ds.labels == i).sum()) for i, c in enumerate(ds.classes)}
        assert {c: n for c, n in counts.items() if n} == {i: n for i, n in expected.items() if n}
    assert (
        sets["query"].classes
        == sets["gallery"].classes
        == ["id_00000002", "id_00000004", "id_00000005"]
    )
    assert sets["train"].classes == ["id_00000001", "id_00000007"]
    with pytest.raises(ValueError, match="query, gallery"):
        D.build("inshop", tmp_path, "test")


# ----------------------------------------------------------------------------- Omniglot


def test_omniglot_official_zips_split_background_and_evaluation(tmp_path, monkeypatch):
    background = zip_bytes(omniglot_members("images_background", {"Greek": 3, "Latin": 2}))
    evaluation = zip_bytes(omniglot_members("images_evaluation", {"Atlantean": 2}, seed=7))
    files = {"images_background.zip": background, "images_evaluation.zip": evaluation}
    with serve(files) as srv:
        _official(
            monkeypatch,
            "omniglot",
            *(D.RemoteFile(n, hashlib.md5(b).hexdigest(), (srv.url(n),)) for n, b in files.items()),
        )
        D.prepare("omniglot", tmp_path, progress=False)
    train, test = D.build("omniglot", tmp_path, "train"), D.build("omniglot", tmp_path, "test")
    assert (
        train.classes
        == [
            "Greek/character01",
            "Greek/character02",
            "Greek/character03",
            "Latin/character01",
            "Latin/character02",
        ]
        and len(train) == 10
    )
    assert test.classes == ["Atlantean/character01", "Atlantean/character02"]
    image = test[0][0]
    assert image.mode == "L" and image.size == (12, 12)
    assert set(np.unique(np.asarray(image))) <= {0, 255}


def test_omniglot_background_only_zips_union_and_hold_out_alphabets(tmp_path):
    small1 = zip_bytes(omniglot_members("images_background_small1", {"Alpha": 2, "Greek": 3}))
    small2 = zip_bytes(
        omniglot_members("images_background_small2", {"Greek": 3, "Omega": 1, "Beta": 2})
    )
    (tmp_path / "s1.zip").write_bytes(small1)
    (tmp_path / "s2.zip").write_bytes(small2)
    D.prepare(
        "omniglot",
        tmp_path / "data",
        archive=[tmp_path / "s1.zip", tmp_path / "s2.zip"],
        progress=False,
    )
    train, test = (D.build("omniglot", tmp_path / "data", s) for s in ("train", "test"))
    # sorted alphabets Alpha, Beta, Greek, Omega: positions 1 and 3 (Beta, Omega) are test
    assert {c.split("/")[0] for c in train.classes} == {"Alpha", "Greek"}
    assert len(train.classes) == 5
    assert {c.split("/")[0] for c in test.classes} == {"Beta", "Omega"} and len(test.classes) == 3
    assert len(train) == 10 and len(test) == 6  # Greek counted once


# ----------------------------------------------------------------------------- folder


def _write_image(path, colour, mode="RGB", fmt=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8), colour).convert(mode).save(path, fmt)


def test_folder_tree_with_mixed_modes(tmp_path):
    root = tmp_path / "mine"
    _write_image(root / "train" / "cat" / "a.jpg", (200, 0, 0))
    _write_image(root / "train" / "cat" / "nested" / "b.png", (10, 20, 30), "P")
    _write_image(root / "train" / "dog" / "c.png", (0, 0, 255), "RGBA")
    _write_image(root / "train" / "dog" / "d.tif", (0, 255, 0), "CMYK")
    _write_image(root / "train" / "dog" / "e.png", (90, 90, 90), "L")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    _write_image(root / "test" / "bird" / "f.jpg", (1, 2, 3))
    train = D.build("folder", root, "train")
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0, 0, 1, 1, 1]
    assert all(train[i][0].mode == "RGB" for i in range(len(train)))
    spec = Preprocessing(color="L", mean=(0.0,), std=(1.0,), input_size=8, resize_size=8)
    grey = D.build("folder", root, "train", build_transform(spec, False))
    assert all(grey[i][0].shape == (1, 8, 8) for i in range(len(grey)))
    assert D.build("folder", root, "test").classes == ["bird"]
    D.prepare("folder", root)


def test_folder_csv_is_confined_to_its_folder(tmp_path):
    for i in range(4):
        _write_image(tmp_path / "imgs" / f"{i}.png", (i * 40, 0, 0))
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "path,label,split\nimgs/0.png,10,train\nimgs/1.png,2,train\nimgs/2.png,10,train\n"
        "imgs/3.png,7,test\n"
    )
    train = D.build("folder", csv, "train")
    # numeric labels sort as numbers
    assert train.classes == ["2", "10"] and train.labels.tolist() == [1, 0, 1]
    csv.write_text("imgs/0.png,a,train\n../outside.png,b,train\n")
    with pytest.raises(D.LayoutError, match="outside the dataset folder"):
        D.build("folder", csv, "train")
