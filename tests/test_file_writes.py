"""Atomic writes (msl_kit.files.atomic): file modes as open() gives them (issue 24 item 22), and
several files written all or none (item 5), failed at every step of the commit."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from msl_kit.files import atomic
from msl_kit.files.atomic import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_files,
    atomic_write_text,
)


@pytest.fixture(params=[0o022, 0o077], ids=["umask 022", "umask 077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_22_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask):
    """Every file was mode 0600 (mkstemp's); now as `open(path, "w")`: 0666 less the umask for
    a new file, the file's own mode where it replaces one."""
    with open(tmp_path / "by_open.txt", "w") as f:
        f.write("reference")
    writes = {
        "text.json": lambda p: atomic_write_text(p, "{}"),
        "bytes.npz": lambda p: atomic_write_bytes(p, lambda f: f.write(b"x")),
        "checkpoint.pt": lambda p: atomic_torch_save({"w": torch.zeros(2)}, p),
        "set.pt2": lambda p: atomic_write_files({p: lambda f: f.write(b"y")}),
    }
    for name, write in writes.items():
        write(tmp_path / name)
        assert _mode(tmp_path / name) == _mode(tmp_path / "by_open.txt") == 0o666 & ~umask, name
        os.chmod(tmp_path / name, 0o640)
        write(tmp_path / name)
        assert _mode(tmp_path / name) == 0o640, name


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_5_a_set_of_files_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """Fail each os call of the commit in turn (writes, fsyncs, links, renames, the removal of a
    dropped file): the old set stays byte for byte, with no temp file; then the set commits."""
    old = {"model.pt": b"old module", "model.onnx": b"old onnx", "model.json": b"old description"}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    new = {"model.pt": b"new module", "model.json": b"new description"}
    writes = {tmp_path / n: (lambda f, d=d: f.write(d)) for n, d in new.items()}
    dropped = (tmp_path / "model.onnx",)
    names = ("fsync", "replace", "link", "unlink")
    real = {n: getattr(os, n) for n in names}
    calls: list[str] = []
    fail_at = [-1]

    def counted(name):
        def call(*args, **kwargs):
            calls.append(name)
            if len(calls) - 1 == fail_at[0]:
                raise OSError(errno.EIO, f"simulated failure of {name}")
            return real[name](*args, **kwargs)

        return call

    for name in names:
        monkeypatch.setattr(atomic.os, name, counted(name))
    atomic_write_files(writes, dropped)  # every call a commit makes, in order
    steps = list(calls)
    for name, data in old.items():  # back to the old set
        (tmp_path / name).write_bytes(data)
    assert {"fsync", "replace", "link", "unlink"} <= set(steps)
    failed = 0
    for k, step in enumerate(steps):
        calls.clear()
        fail_at[0] = k
        try:
            atomic_write_files(writes, dropped)
        except OSError as e:
            assert "simulated" in str(e)
            assert _files(tmp_path) == old, (k, step)
            failed += 1
        else:  # a failure after the commit (the folder's fsync, a clean-up) is harmless
            for stray in tmp_path.glob(".*.old.tmp"):  # a kept old version, named as temps are
                stray.unlink()
            assert _files(tmp_path) == new, (k, step)
            for name, data in old.items():
                (tmp_path / name).write_bytes(data)
            (tmp_path / "model.onnx").write_bytes(old["model.onnx"])
    assert failed >= 5  # both writes, both renames, the drop (a failed link falls back to a copy)
    fail_at[0] = -1
    atomic_write_files(writes, dropped)
    assert _files(tmp_path) == new
