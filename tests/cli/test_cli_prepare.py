"""`msl-kit prepare`: the dataset list, a local archive, a download, the second run doing
nothing, and every anticipated failure as one line, exit 2 and nothing left behind."""

from __future__ import annotations

import socket

import pytest
from fake_data import (
    bomb_tgz,
    cars_archives,
    cars_images,
    cars_tree,
    cub_members,
    serve,
    tar_bytes,
    zip_bytes,
)

from msl_kit import cli, datasets


def test_list_shows_every_dataset_with_size_licence_source(capsys):
    assert cli.main(["prepare", "--list"]) == 0
    out = capsys.readouterr().out
    for d in datasets.list_datasets():
        line = next(line for line in out.splitlines() if line.startswith(d.name + " "))
        assert d.size in line and d.licence in line and d.source in line


def test_prepare_from_archive_then_again(tmp_path, capsys):
    archive = tmp_path / "CUB_200_2011.tgz"
    archive.write_bytes(tar_bytes(cub_members()))
    root = tmp_path / "data"
    assert cli.main(["prepare", "cub200", "--root", str(root), "--archive", str(archive)]) == 0
    assert "ready in" in capsys.readouterr().out
    train = datasets.build("cub200", root, "train")
    assert len(train) > 0 and set(train.labels) == set(range(len(train.classes)))
    assert cli.main(["prepare", "cub200", "--root", str(root), "--archive", str(archive)]) == 0
    assert "already prepared" in capsys.readouterr().out + capsys.readouterr().err


def test_prepare_by_download_from_a_local_server(tmp_path):
    with serve({"CUB_200_2011.tgz": tar_bytes(cub_members())}) as server:
        url = server.url("CUB_200_2011.tgz")
        assert cli.main(["prepare", "cub200", "--root", str(tmp_path), "--url", url]) == 0
    assert len(datasets.build("cub200", tmp_path, "test")) > 0


def test_missing_archive_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["prepare", "sop", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--archive" in err


def _one_line(capsys) -> str:
    """The CLI's stderr, asserted to be exactly one `error: ...` line."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _listing(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_truncated_archive_is_one_line_and_leaves_nothing(tmp_path, capsys, kind):
    data = (tar_bytes if kind == "tgz" else zip_bytes)(cub_members())
    archive = tmp_path / f"cub.{kind}"
    archive.write_bytes(data[: len(data) // 2])
    root = tmp_path / "data"
    assert cli.main(["prepare", "cub200", "--root", str(root), "--archive", str(archive)]) == 2
    err = _one_line(capsys)
    assert f"cub.{kind} is truncated or damaged" in err and "download it again" in err
    assert not root.exists()


def test_bomb_is_refused_by_default_and_limits_come_from_the_flags(tmp_path, capsys):
    bomb = tmp_path / "bomb.tgz"
    bomb.write_bytes(bomb_tgz())  # 3 MB declaring 3 GiB
    root = tmp_path / "data"
    prepare = ["prepare", "cub200", "--root", str(root), "--archive"]
    assert cli.main([*prepare, str(bomb)]) == 2
    assert "declares 3.2 GB of files, over 100x its size" in _one_line(capsys)
    assert cli.main([*prepare, str(bomb), "--max-size", "1"]) == 2
    assert "declares more than 1.0 GB of files" in _one_line(capsys)
    cub = tmp_path / "cub.tgz"
    cub.write_bytes(tar_bytes(cub_members()))
    assert cli.main([*prepare, str(cub), "--max-files", "3"]) == 2
    assert "holds more than 3 members; refusing to extract" in _one_line(capsys)
    assert not root.exists()
    assert cli.main([*prepare, str(cub), "--max-files", "0"]) == 2
    assert "max_members must be positive" in _one_line(capsys)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


@pytest.mark.parametrize(
    "url,says",
    [
        ("closed", "could not download x.tgz: download of http://127.0.0.1"),
        ("not-a-url", "'not-a-url' is not an http(s) URL"),
        ("404", "answered HTTP 404 Not Found"),
    ],
)
def test_offline_or_bad_url_is_one_line_and_leaves_nothing(
    tmp_path, capsys, monkeypatch, url, says
):
    monkeypatch.setattr("msl_kit.files.download.time.sleep", lambda s: None)  # retries, not waits
    root = tmp_path / "data"
    with serve({}) as srv:
        given = {"closed": f"http://127.0.0.1:{_closed_port()}/x.tgz", "404": srv.url("x.tgz")}
        assert cli.main(["prepare", "sop", "--root", str(root), "--url", given.get(url, url)]) == 2
    err = _one_line(capsys)
    assert says in err and "msl-kit prepare sop --root" in err  # and where else to get it
    assert not root.exists()


def test_failed_prepare_removes_what_it_extracted_but_keeps_downloads(tmp_path, capsys):
    cub = tar_bytes(cub_members())  # a good archive of the wrong dataset: a layout error
    root = tmp_path / "data"
    with serve({"files/sop.tgz": cub}) as srv:
        for attempt in range(2):
            assert (
                cli.main(["prepare", "sop", "--root", str(root), "--url", srv.url("files/sop.tgz")])
                == 2
            )
            err = capsys.readouterr().err.splitlines()[-1]  # after the download's progress bar
            assert err.startswith("error: ") and "has no Ebay_train.txt" in err
            assert _listing(root) == ["sop", "sop/downloads", "sop/downloads/sop.tgz"]
    assert len(srv.requests) == 1  # the second run used the kept download


def test_failed_prepare_from_local_archives_leaves_the_root_as_it_was(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    before = _listing(root)
    tree, _ = cars_tree("torchvision", cars_images(real=False))
    files = cars_archives("torchvision", tree, tmp_path / "given")
    test_tgz = tmp_path / "given" / "cars_test.tgz"  # extracted after cars_train.tgz
    test_tgz.write_bytes(test_tgz.read_bytes()[:-200])
    assert cli.main(["prepare", "cars196", "--root", str(root), "--archive", *map(str, files)]) == 2
    assert "cars_test.tgz is truncated or damaged" in _one_line(capsys)
    assert _listing(root) == before
