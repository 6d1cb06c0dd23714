"""One error type: every error msl_kit raises on purpose is an `MslKitError`, printed by the CLI
as one `error:` line with exit 2; a bug keeps its traceback (exit 1). And using a model does not
depend on the device it was trained on (issue 24.13, 24.14)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch

import msl_kit
from msl_kit import cli
from msl_kit.errors import MslKitError
from msl_kit.train import checkpoint, engine
from msl_kit.train.rundir import RunFolder


def _line(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def test_every_error_class_of_the_kit_derives_from_mslkiterror():
    """Keeping the builtin base each had (ValueError, OSError, RuntimeError), so a caller's
    `except ValueError` still works; Interrupted is a KeyboardInterrupt, notes are warnings."""
    allowed = {"Interrupted", "ConfigNote", "_Incomplete", "_Reached"}  # _Reached: a signal
    # that stops a backbone's forward at the frozen prefix's end (models/prefix.py), never raised
    # out of it
    found = []
    for info in pkgutil.walk_packages(msl_kit.__path__, "msl_kit."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                if obj.__module__ == info.name and name not in allowed:
                    found.append(obj)
    assert len(found) >= 20
    assert [c.__name__ for c in found if not issubclass(c, MslKitError)] == []
    from msl_kit.train.rundir import RunFolderError
    from msl_kit.train.validation import ConfigError

    assert issubclass(ConfigError, ValueError) and issubclass(RunFolderError, OSError)


@pytest.mark.parametrize(
    "argv, start",
    [
        (["train", "--set", "loss.ms.beta=abc"], "error: loss.ms.beta expects float"),
        (["prepare", "no_such_set", "--root", "."], "error: unknown dataset 'no_such_set'"),
        (["evaluate", "--checkpoint", "missing.pt"], "error: checkpoint missing.pt does not"),
        (["search", "--index", "missing.npz", "--query", "x.png"], "error: no embeddings file"),
        (
            ["train", "--config", "cub200_lite0_cpu", "--set", "cache.views=-1"],
            "error: cache.views = -1 is not allowed: use 0 <= value <= 1000",
        ),
        (
            ["train", "--config", "cub200_lite0_cpu", "--set", "model.backbone=timm:resnet18"],
            "error: model.pretrained=efficientnet_lite0 holds timm:tf_efficientnet_lite0 weights",
        ),
    ],
)
def test_anticipated_failures_are_one_line_and_exit_2(argv, start, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = _line(capsys, *argv)
    assert rc == 2 and err.startswith(start) and err.count("\n") == 1, err


def test_an_unfit_weights_file_or_archive_is_one_line(capsys, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(3)}, weights)
    rc, err = _line(capsys, "train", "--set", f"model.pretrained={weights}", "--out", "x")
    assert rc == 2 and "does not fit this backbone" in err and err.count("\n") == 1, err
    notes = tmp_path / "notes.txt"
    notes.write_text("not an archive")
    rc, err = _line(capsys, "prepare", "cub200", "--root", str(tmp_path), "--archive", str(notes))
    assert rc == 2 and err.count("\n") == 1, err


def test_a_bug_shows_its_traceback_and_asks_to_report_it(capsys, monkeypatch):
    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(engine, "train", broken)
    rc, err = _line(capsys, "train", "--set", "train.iterations=1")
    assert rc == 1 and "Traceback" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1].startswith("error: this is a bug in msl-kit")


def _trained_on(run: Path, device: str, tmp_path: Path) -> Path:
    """A copy of `run` whose checkpoint says it was trained with `device`."""
    path = tmp_path / "cuda.pt"
    state = checkpoint.load_checkpoint(RunFolder(run).checkpoint)
    state["config"]["device"] = device
    checkpoint.save_checkpoint(state, path)
    return path


def test_a_model_trained_on_cuda_is_used_on_the_cpu(digits_run, tmp_path, capsys):
    """Issue 24.13: `evaluate --device cpu` / `embed --device cpu` failed with "device =
    'cuda:63' is not allowed" (the stored device was checked before --device applied) and
    advised `--set device=cpu`, a flag these commands lack."""
    if torch.cuda.device_count() > 63:
        pytest.skip("this machine has a cuda:63")
    ckpt = _trained_on(digits_run, "cuda:63", tmp_path)
    out = tmp_path / "m.json"
    args = ("evaluate", "--checkpoint", str(ckpt), "--out", str(out))
    rc, err = _line(capsys, *args, "--device", "cpu")
    assert rc == 0 and "--set" not in err, err
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    from PIL import Image

    for i in range(2):
        Image.new("L", (8, 8), 40 * i).save(images / "a" / f"{i}.png")
    args = ("embed", "--checkpoint", str(ckpt), "--images", str(images))
    rc, err = _line(capsys, *args, "--out", str(tmp_path / "e.npz"), "--device", "cpu")
    assert rc == 0, err
    # no --device: the stored one where this machine has it, else the CPU, said in a note
    with pytest.warns(Warning, match="trained on cuda:63, which this machine lacks: using the CPU"):
        model, cfg = checkpoint.load_model(ckpt, device=None)
    assert cfg.device == "cpu" and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("device", ["tpu", "cuda:63", "gpu0"])
def test_a_device_this_machine_lacks_is_one_line(digits_run, device, tmp_path, capsys):
    """Issue 24.14: `embed --device tpu` or `--device cuda` without a GPU was a RuntimeError
    traceback; embed, evaluate (and search, through embed) check it as train does."""
    if device.startswith("cuda") and torch.cuda.device_count() > 63:
        pytest.skip("this machine has a cuda:63")
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    (images / "a" / "0.png").write_bytes(b"")
    embedded = str(tmp_path / "e.npz")
    for argv in (
        ("embed", "--checkpoint", str(digits_run), "--images", str(images), "--out", embedded),
        ("evaluate", "--checkpoint", str(digits_run), "--out", str(tmp_path / "m.json")),
    ):
        rc, err = _line(capsys, *argv, "--device", device)
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: device '{device}' cannot be used") and "--set" not in err
    assert not (tmp_path / "e.npz").exists()


def test_ranks_past_the_evaluation_split_are_one_line_in_evaluate(digits_run, tmp_path, capsys):
    """evaluate checks eval.ks against its split as training does (not a metrics traceback)."""
    state = checkpoint.load_checkpoint(RunFolder(digits_run).checkpoint)
    state["config"]["eval"]["ks"] = [1, 100000]
    path = tmp_path / "wide.pt"
    checkpoint.save_checkpoint(state, path)
    rc, err = _line(
        capsys, "evaluate", "--checkpoint", str(path), "--out", str(tmp_path / "m.json")
    )
    assert (
        rc == 2
        and err.startswith("error: eval.ks = [1, 100000] is not allowed")
        and (err.count("\n") == 1)
    ), err
