"""msl_kit.fileio: atomic writes and saves, including a real full disk (a 1 MiB tmpfs)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

from msl_kit.files import atomic as fileio
from msl_kit.train import checkpoint


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A real 1 MiB tmpfs, unmounted afterwards; skipped where mounting is not permitted."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot run mount for a real full-disk test: {e}")
    if done.returncode != 0:
        pytest.skip(f"mounting a 1 MiB tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)


def test_a_real_full_disk_is_reported_as_enospc(tiny_disk):
    path = tiny_disk / "checkpoint.pt"
    checkpoint.save_checkpoint({"model": {"w": torch.zeros(10)}, "iteration": 1}, path)
    checkpoint.save_checkpoint({"model": {"w": torch.ones(10)}, "iteration": 2}, path)
    before = path.read_bytes()
    big = {"model": {"w": torch.zeros(400_000)}, "iteration": 3}  # 1.6 MB: more than the disk
    with pytest.raises(OSError) as info:
        checkpoint.save_checkpoint(big, path)
    # not torch's "RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos"
    assert type(info.value) is OSError and info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert f"could not write {path} (No space left on device)" in message
    assert f"the disk holding {tiny_disk} is full" in message
    assert "previous checkpoint is kept" in message
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert path.read_bytes() == before  # the temp file is gone, the last good file untouched
    assert checkpoint.load_latest(tiny_disk)[0]["iteration"] == 2
    with pytest.raises(OSError, match="is full") as info:
        fileio.atomic_torch_save(big, tiny_disk / "other.pt")
    assert info.value.errno == errno.ENOSPC and not (tiny_disk / "other.pt").exists()


def test_other_torch_errors_pass_through(tmp_path):
    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        fileio.atomic_torch_save({"x": Unsaveable()}, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_and_safe_load_round_trip(tmp_path):
    fileio.atomic_write_text(tmp_path / "a.txt", "one\n")
    fileio.atomic_write_text(tmp_path / "a.txt", "two\n")
    assert (tmp_path / "a.txt").read_text() == "two\n"
    fileio.atomic_torch_save({"w": torch.arange(3)}, tmp_path / "w.pt")
    assert torch.equal(fileio.safe_load(tmp_path / "w.pt", "weights file")["w"], torch.arange(3))
    with pytest.raises(fileio.SafeLoadError, match="weights file .*missing.pt does not exist"):
        fileio.safe_load(tmp_path / "missing.pt", "weights file")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "w.pt"]


def test_msl_kit_train_onto_a_real_full_disk_is_one_line_and_exit_2(tiny_disk, capsys):
    """Issue 12 item 11 end to end: `msl-kit train --out` on a real (1 MiB) tmpfs that fills up."""
    from msl_kit import cli

    out = tiny_disk / "run"
    args = ["train", "--config", "digits", "--out", str(out), "--no-baseline"]
    for key in (
        "train.iterations=40",
        "train.checkpoint_every=5",
        "train.eval_every=0",
        "model.convnet.width=256",
        "train.threads=1",
    ):  # a ~3 MB optimizer state: the disk fills
        args += ["--set", key]
    rc = cli.main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "[Errno 28]" in lines[0] and "is full" in lines[0]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no torn temp file left


def test_a_text_file_is_called_corrupt_not_dangerous(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(fileio.SafeLoadError, match="is truncated or corrupt") as info:
        fileio.safe_load(path)
    assert "could run code" not in str(info.value)
