"""`msl-kit prepare`: the dataset list, a local archive, a download, and the second run doing nothing."""
from __future__ import annotations

from _fixtures_data import cub_members, serve, tar_bytes

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
