"""Checkpoints as data: a full disk or a torn file never loses the last good one, a damaged one
is named in one line, one that would run code is refused (and backbone weights too), a
width mismatch says which key to set, random states survive a save exactly."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, FAST_ARGS, error_line, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from msl_kit import cli, losses, models
from msl_kit.train import checkpoint as ckpt
from msl_kit.train import engine, trainer
from msl_kit.train.config import load_config


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _no_temp_files(run: Path) -> bool:
    return not list(run.glob(".*.tmp"))


def test_embedding_width_mismatch(digits_run, tmp_path, capsys):
    state = ckpt.load_checkpoint(digits_run / "checkpoint.pt")  # a 64-d run
    wide = models.build_model("convnet", 128, in_channels=1, input_size=8)
    with pytest.raises(ValueError, match=r"64 -> 64.*set model.embedding_dim=64"):
        wide.load_state_dict(state["model"])
    # a checkpoint whose config says 128-d but whose weights are 64-d (edited or mixed files)
    state["config"]["model"]["embedding_dim"] = 128
    edited = tmp_path / "edited.pt"
    torch.save(state, edited)
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(edited)]) == 2
    line = error_line(capsys.readouterr().err)
    assert str(edited) in line and "model.embedding_dim=64" in line
    x = nn.functional.normalize(torch.randn(4, 64), dim=1)
    with pytest.raises(
        ValueError, match="ref_embeddings has dim 128, embeddings 64; they must match"
    ):
        losses.MultiSimilarityLoss()(x, [0, 0, 1, 1], torch.randn(3, 128), torch.tensor([0, 1, 1]))


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint({"model": {"w": torch.zeros(3)}, "iteration": 1}, path)
    ckpt.save_checkpoint({"model": {"w": torch.ones(3)}, "iteration": 2}, path)
    before = path.read_bytes()
    monkeypatch.setattr(ckpt.os, "fsync", _enospc)
    with pytest.raises(OSError) as info:
        ckpt.save_checkpoint({"model": {"w": torch.full((3,), 7.0)}, "iteration": 3}, path)
    assert info.value.errno == errno.ENOSPC
    assert f"could not write {path} (No space left on device)" in str(info.value)
    assert "previous version of that file is untouched" in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and _no_temp_files(tmp_path)
    assert ckpt.load_latest(tmp_path)[0]["iteration"] == 2
    # without hard links the fallback copy is written atomically too: a full disk leaves no torn
    # copy
    monkeypatch.setattr(ckpt.os, "link", lambda *a: _enospc())
    ckpt.save_checkpoint({"model": {"w": torch.ones(3)}, "iteration": 3}, path)
    assert ckpt.load_checkpoint(path.with_suffix(".prev.pt"))["iteration"] == 2
    monkeypatch.setattr(ckpt.os, "fsync", _enospc)
    before = path.read_bytes()
    with pytest.raises(OSError, match="prev.pt"):
        ckpt.save_checkpoint({"model": {"w": torch.ones(3)}, "iteration": 4}, path)
    assert path.read_bytes() == before and _no_temp_files(tmp_path)


def _fail_saving(monkeypatch, iteration: int) -> None:
    """torch.save writes half a checkpoint for `iteration`, then the disk is full."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == iteration and hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a checkpoint")
            _enospc()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_during_training_then_resume_loses_nothing(
    digits_run, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    _fail_saving(monkeypatch, 4)
    rc, err = run_cli(capsys, "train", "--out", str(out), *FAST_ARGS)
    line = error_line(err)
    assert rc == 2 and f"could not write {out / 'checkpoint.pt'} (No space left on device)" in line
    assert ckpt.load_latest(out)[0]["iteration"] == 2 and _no_temp_files(out)
    monkeypatch.undo()  # space freed
    rc, err = run_cli(capsys, "train", "--resume", str(out), "--no-baseline")
    assert rc == 0, err
    assert _metrics(out) == _metrics(digits_run)


class _StopAt(trainer.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, record: dict) -> None:
        if record["iteration"] == self.at:
            raise KeyboardInterrupt


def test_resume_with_a_corrupt_checkpoint_falls_back_to_the_previous_one(
    digits_run, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        engine.train(
            load_config("digits", FAST), out, callbacks=[_StopAt(5)]
        )  # checkpoints at 2 and 4
    latest = out / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # torn by a faulty disk or copy
    _fail_saving(monkeypatch, 4)  # and the resumed run dies while writing its next checkpoint
    with pytest.warns(
        UserWarning, match=f"checkpoint {latest} is truncated or corrupt.*trying the previous"
    ):
        rc, err = run_cli(capsys, "train", "--resume", str(out), "--no-baseline")
    assert rc == 2 and "could not write" in error_line(err)
    # the torn file was set aside, so it never became the fallback copy: iteration 2 survives
    assert ckpt.load_latest(out)[0]["iteration"] == 2
    assert (out / "checkpoint.corrupt.pt").exists()
    monkeypatch.undo()
    rc, err = run_cli(capsys, "train", "--resume", str(out), "--no-baseline")
    assert rc == 0, err
    assert _metrics(out) == _metrics(digits_run)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_evaluate_a_damaged_checkpoint_names_the_file(digits_run, tmp_path, capsys, damage):
    path = tmp_path / "checkpoint.pt"
    data = (digits_run / "checkpoint.pt").read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"hello world"}[damage]
    )
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(path)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"checkpoint {path} is truncated or corrupt" in line


class _Payload:
    """Unpickling this runs `exec`: what a booby-trapped checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_a_checkpoint_that_would_run_code_is_refused(digits_run, tmp_path, capsys):
    proof, marker = tmp_path / "proof", tmp_path / "marker"
    state = ckpt.load_checkpoint(digits_run / "checkpoint.pt")
    torch.save({**state, "extra": _Payload(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)  # what an unsafe load would do
    assert proof.read_text() == "pwned"

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    evil = run / "checkpoint.pt"
    torch.save({**state, "extra": _Payload(marker)}, evil)
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(evil)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"checkpoint {evil} was refused" in line and "could run code" in line
    # resume skips it for the previous checkpoint, with a warning ...
    with pytest.warns(UserWarning, match="was refused"):
        assert ckpt.load_latest(run)[1].name == "checkpoint.prev.pt"
    # ... and with no good one left, refuses to resume
    (run / "checkpoint.prev.pt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, err = run_cli(capsys, "train", "--resume", str(run), "--no-baseline")
    assert rc == 2 and "was refused" in error_line(err)
    assert not marker.exists()


def _evil_weights(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = tmp_path / "backbone.pth"
    torch.save({"layer.weight": torch.zeros(2), "trap": _Payload(marker)}, path)
    return path, marker


def test_backbone_weights_that_would_run_code_never_run(tmp_path):
    path, marker = _evil_weights(tmp_path)
    with pytest.raises(Exception):
        models.build_model("convnet", 64, pretrained=path, in_channels=1, input_size=8)
    assert not marker.exists()


def test_backbone_weights_that_would_run_code_get_a_clear_error(tmp_path, capsys):
    path, marker = _evil_weights(tmp_path)
    rc, err = run_cli(
        capsys,
        "train",
        "--out",
        str(tmp_path / "run"),
        *FAST_ARGS,
        "--set",
        f"model.pretrained={path}",
    )
    line = error_line(err)
    assert rc == 2 and str(path) in line and "weights_only=False" not in line
    assert not marker.exists()


def test_checkpoint_without_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"model": {}}, path)
    rc, line = run_cli(capsys, "evaluate", "--checkpoint", str(path))
    assert rc == 2 and "no stored config" in line


SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2**31), before=st.integers(0, 700), after=st.integers(1, 50))
def test_random_states_survive_a_checkpoint_exactly(seed, before, after):
    def draws() -> tuple:
        return (
            [random.random() for _ in range(after)],
            np.random.standard_normal(after).tolist(),
            np.random.randint(0, 2**31, after).tolist(),
            torch.rand(after).tolist(),
        )

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    for _ in range(
        before
    ):  # leave every generator somewhere in its stream (numpy's gauss cache too)
        random.random(), np.random.standard_normal(), torch.rand(1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pt"
        ckpt.save_checkpoint({"model": {}, "rng": ckpt.rng_state()}, path)
        expected = draws()
        draws()  # move on, then restore from the file
        ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"])
        assert draws() == expected
