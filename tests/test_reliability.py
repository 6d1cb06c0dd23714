"""Bad inputs, tried for real: what the user sees, and that nothing already saved is lost.

Each test here backs one or more rows of docs/reliability.md. Training runs are tiny (6
iterations of the embedded digits demo) and run in-process through `cli.main` where the
user-facing message matters, so the whole file stays well under a minute.
"""

from __future__ import annotations

import ast
import copy
import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from msl_kit import cli, datasets, losses, metrics, models
from msl_kit.train import checkpoint as ckpt
from msl_kit.train import engine, recipe, trainer
from msl_kit.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "train.iterations=6",
    "train.checkpoint_every=2",
    "train.eval_every=0",
    "train.threads=1",
    "eval.floors=false",
]
FAST_ARGS = ["--config", "digits"] + [a for s in FAST for a in ("--set", s)] + ["--no-baseline"]
NAN = float("nan")


# ----------------------------------------------------------------------------- helpers
def _error_line(err: str) -> str:
    """The single `error: ...` line the CLI printed, on a line of its own, with no traceback."""
    lines = [line for line in err.split("\n") if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: "), (
        f"the error shares its line with other output: {lines[0]!r}"
    )
    return lines[0]


def _train_cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(["train", *args])
    return rc, capsys.readouterr().err


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _no_temp_files(run: Path) -> bool:
    return not list(run.glob(".*.tmp"))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same_tensors(a, b) -> None:
    """Nested dicts / lists of tensors and numbers, compared exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tensors(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 6-iteration run: checkpoints at 2, 4, 6, metrics.json at the end."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(["train", "--out", str(out), *FAST_ARGS]) == 0
    return out


@pytest.fixture
def capture(monkeypatch) -> dict:
    """Record the model (and its initial weights) and the optimizer that `engine.train` builds."""
    seen: dict = {}
    real_build, real_optimizer = recipe.build_model, recipe.build_optimizer

    def build(cfg, **kw):
        seen["model"] = real_build(cfg, **kw)
        seen["initial"] = _params(seen["model"])
        return seen["model"]

    def optimizer(model, cfg, *loss):
        seen["optimizer"] = real_optimizer(model, cfg, *loss)
        return seen["optimizer"]

    monkeypatch.setattr(recipe, "build_model", build)
    monkeypatch.setattr(recipe, "build_optimizer", optimizer)
    return seen


# ----------------------------------------------------------------------------- divergence
class _FailingLoss(nn.Module):
    """The MS loss, except that call `at` returns NaN (kind="loss") or a finite loss whose
    gradient is NaN (kind="grad"); it snapshots the weights and optimizer state right then."""

    def __init__(self, at: int, kind: str, seen: dict) -> None:
        super().__init__()
        self.at, self.kind, self.seen, self.calls = at, kind, seen, 0
        self.ms = losses.MultiSimilarityLoss()

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.ms(emb, labels)
        if self.calls != self.at:
            return loss
        self.seen["before"] = _params(self.seen["model"])
        self.seen["optimizer_before"] = copy.deepcopy(self.seen["optimizer"].state_dict())
        if self.kind == "loss":
            return loss * NAN
        return loss + torch.sqrt((emb * 0).sum())  # value + 0, gradient 0 * inf = NaN


@pytest.mark.parametrize("kind, what", [("loss", "the loss"), ("grad", "a gradient")])
def test_divergence_stops_before_any_weight_changes_and_keeps_last_good_checkpoint(
    tmp_path, capture, kind, what
):
    out = tmp_path / "run"
    with pytest.raises(trainer.DivergenceError) as info:
        engine.train(load_config("digits", FAST), out, loss_fn=_FailingLoss(5, kind, capture))
    message = str(info.value)
    assert f"{what} became NaN or inf at iteration 5" in message
    assert (
        "train.lr" in message and f"last good checkpoint {out / 'checkpoint.pt'} is kept" in message
    )
    # the step was stopped: no parameter and no Adam moment moved
    model, optimizer = capture["model"], capture["optimizer"]
    _assert_same_tensors(_params(model), capture["before"])
    _assert_same_tensors(optimizer.state_dict(), capture["optimizer_before"])
    assert any(
        not torch.equal(p, capture["initial"][n]) for n, p in _params(model).items()
    )  # it did train
    # the last good checkpoint (iteration 4) is intact, loadable, and holds exactly these weights
    state, path = ckpt.load_latest(out)
    assert path.name == "checkpoint.pt" and state["iteration"] == 4
    _assert_same_tensors(
        {name: state["model"][name] for name in capture["before"]}, capture["before"]
    )
    fresh = recipe.build_model(load_config("digits", FAST))
    fresh.load_state_dict(state["model"])
    assert not (out / "metrics.json").exists() and _no_temp_files(out)


class _NaNImages(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.labels = dataset, dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        image, label, idx = self.dataset[index]
        return torch.full_like(image, NAN), label, idx


def test_nan_images_stop_at_the_first_step(tmp_path, capture, monkeypatch):
    real_build = datasets.build
    monkeypatch.setattr(
        recipe,  # the recipe is the one caller of datasets.build with config values
        "build",
        lambda name, root, split, transform=None, **kw: (
            _NaNImages(real_build(name, root, split, transform, **kw))
            if split == "train"
            else real_build(name, root, split, transform, **kw)
        ),
    )
    with pytest.raises(
        trainer.DivergenceError, match="the embeddings became NaN or inf at iteration 1"
    ) as info:
        engine.train(load_config("digits", FAST), tmp_path / "run")
    assert "no checkpoint had been written yet" in str(info.value) and "input images" in str(
        info.value
    )
    _assert_same_tensors(_params(capture["model"]), capture["initial"])
    assert capture["optimizer"].state_dict()["state"] == {}


def test_cli_divergence_is_one_line_and_nonzero_exit(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _train_cli(
        capsys,
        "--out",
        str(out),
        *FAST_ARGS,
        "--set",
        "train.lr=1e30",
        "--set",
        "train.checkpoint_every=1",
    )
    line = _error_line(err)
    assert rc == 1
    assert "became NaN or inf at iteration 2" in line and "Try a lower train.lr" in line
    assert str(out / "checkpoint.pt") in line
    state = ckpt.load_checkpoint(out / "checkpoint.pt")  # iteration 1, before the blow-up
    assert state["iteration"] == 1 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )


# ----------------------------------------------------------------------------- bad tensors
STRING_LABELS = ["cat", "cat", "dog", "dog"]


@pytest.mark.parametrize(
    "labels",
    [
        STRING_LABELS,
        np.array(STRING_LABELS),
        tuple(STRING_LABELS),
        torch.tensor([0.0, 0.0, 1.0, 1.0]),
        np.array([0.0, 0.0, 1.0, 1.0]),
        [0.5, 0.5, 1.5, 1.5],
    ],
    ids=["str-list", "str-numpy", "str-tuple", "float-tensor", "float-numpy", "float-list"],
)
def test_loss_rejects_string_and_float_labels_with_the_fix(labels):
    x = nn.functional.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(
        TypeError, match=r"integer class ids.*np\.unique\(labels, return_inverse=True\)"
    ):
        losses.MultiSimilarityLoss()(x, labels)


def test_loss_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="empty batch; the loss needs at least one sample"):
        losses.MultiSimilarityLoss()(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        losses.multi_similarity_loss(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))


def test_metrics_reject_float_labels_nan_and_empty_input():
    x = nn.functional.normalize(torch.randn(6, 4), dim=1)
    with pytest.raises(ValueError, match="must be integers.*map class names to ints first"):
        metrics.recall_at_k(x, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0], ks=(1,))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.recall_at_k(torch.zeros(0, 4), [], ks=(1,))
    with pytest.raises(ValueError, match="NaN.*fix \\(or rescale\\) the model output"):
        metrics.recall_at_k(torch.full((6, 4), NAN), [0, 0, 1, 1, 2, 2], ks=(1,))


def test_metrics_reject_string_labels_with_the_fix():
    x = nn.functional.normalize(torch.randn(6, 4), dim=1)
    with pytest.raises((TypeError, ValueError), match="map class names to ints"):
        metrics.recall_at_k(x, ["a", "a", "b", "b", "c", "c"], ks=(1,))


def test_embedding_width_mismatch(reference, tmp_path, capsys):
    state = ckpt.load_checkpoint(reference / "checkpoint.pt")  # a 64-d run
    wide = models.build_model("convnet", 128, in_channels=1, input_size=8)
    with pytest.raises(ValueError, match=r"64 -> 64.*set model.embedding_dim=64"):
        wide.load_state_dict(state["model"])
    # a checkpoint whose config says 128-d but whose weights are 64-d (edited or mixed files)
    state["config"]["model"]["embedding_dim"] = 128
    edited = tmp_path / "edited.pt"
    torch.save(state, edited)
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(edited)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(edited) in line and "model.embedding_dim=64" in line
    x = nn.functional.normalize(torch.randn(4, 64), dim=1)
    with pytest.raises(
        ValueError, match="ref_embeddings has dim 128, embeddings 64; they must match"
    ):
        losses.MultiSimilarityLoss()(x, [0, 0, 1, 1], torch.randn(3, 128), torch.tensor([0, 1, 1]))


# ----------------------------------------------------------------------------- config and folders
def test_unknown_dataset_name(tmp_path, capsys):
    rc, err = _train_cli(
        capsys, "--out", str(tmp_path / "run"), *FAST_ARGS, "--set", "data.name=nope"
    )
    line = _error_line(err)
    assert rc == 2 and "unknown dataset 'nope'; choose one of:" in line and "digits" in line


def test_unknown_config_key_on_the_command_line_and_in_a_file(tmp_path, capsys):
    rc, err = _train_cli(capsys, "--out", str(tmp_path / "a"), "--set", "train.lrr=0.1")
    line = _error_line(err)
    assert (
        rc == 2
        and "unknown config key 'train.lrr'. Did you mean train.lr" in line
        and "Valid keys:" in line
    )
    cfg_file = tmp_path / "mine.yaml"
    cfg_file.write_text("train:\n  iterations: 5\n  bach_size: 20\n")
    rc, err = _train_cli(capsys, "--out", str(tmp_path / "b"), "--config", str(cfg_file))
    assert (
        rc == 2
        and "unknown config key 'train.bach_size'. Did you mean train.batch_size"
        in _error_line(err)
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_yaml_with_a_python_tag_is_refused(tmp_path, capsys):
    proof, marker = tmp_path / "proof", tmp_path / "marker"
    evil = "train:\n  iterations: !!python/object/apply:os.system ['touch {}']\n"
    yaml.unsafe_load(evil.format(proof))  # what an unsafe loader would do with this file
    assert proof.exists()
    cfg_file = tmp_path / "evil.yaml"
    cfg_file.write_text(evil.format(marker))
    rc, err = _train_cli(capsys, "--out", str(tmp_path / "run"), "--config", str(cfg_file))
    line = _error_line(err)
    assert (
        rc == 2
        and str(cfg_file) in line
        and "is not valid YAML" in line
        and "python/object" in line
    )
    assert not marker.exists()


def test_out_folder_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc, err = _train_cli(capsys, "--out", str(blocker / "run"), *FAST_ARGS)
    line = _error_line(err)
    assert (
        rc == 2
        and f"cannot write to the output folder {blocker / 'run'}" in line
        and "--out" in line
    )
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0,
    reason="root writes into a 0o500 folder anyway; the under-a-file case covers root",
)
def test_read_only_out_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        rc, err = _train_cli(capsys, "--out", str(folder), *FAST_ARGS)
    finally:
        folder.chmod(0o700)
    assert rc == 2 and "cannot write to the output folder" in _error_line(err)


def test_out_pointing_at_an_existing_run_is_refused(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc, err = _train_cli(capsys, "--out", str(run), *FAST_ARGS)
    line = _error_line(err)
    assert rc == 2 and f"msl-kit train --resume {run}" in line and "another --out" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_of_a_missing_folder_does_not_create_it(tmp_path, capsys):
    missing = tmp_path / "typo"
    rc, err = _train_cli(capsys, "--resume", str(missing), "--no-baseline")
    line = _error_line(err)
    assert rc == 2 and f"cannot resume from {missing}" in line and "drop --resume" in line
    assert not missing.exists()


# ----------------------------------------------------------------------------- checkpoints
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
    reference, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    _fail_saving(monkeypatch, 4)
    rc, err = _train_cli(capsys, "--out", str(out), *FAST_ARGS)
    line = _error_line(err)
    assert rc == 2 and f"could not write {out / 'checkpoint.pt'} (No space left on device)" in line
    assert ckpt.load_latest(out)[0]["iteration"] == 2 and _no_temp_files(out)
    monkeypatch.undo()  # space freed
    rc, err = _train_cli(capsys, "--resume", str(out), "--no-baseline")
    assert rc == 0, err
    assert _metrics(out) == _metrics(reference)


class _StopAt(trainer.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, record: dict) -> None:
        if record["iteration"] == self.at:
            raise KeyboardInterrupt


def test_resume_with_a_corrupt_checkpoint_falls_back_to_the_previous_one(
    reference, tmp_path, capsys, monkeypatch
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
        rc, err = _train_cli(capsys, "--resume", str(out), "--no-baseline")
    assert rc == 2 and "could not write" in _error_line(err)
    # the torn file was set aside, so it never became the fallback copy: iteration 2 survives
    assert ckpt.load_latest(out)[0]["iteration"] == 2
    assert (out / "checkpoint.corrupt.pt").exists()
    monkeypatch.undo()
    rc, err = _train_cli(capsys, "--resume", str(out), "--no-baseline")
    assert rc == 0, err
    assert _metrics(out) == _metrics(reference)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_evaluate_a_damaged_checkpoint_names_the_file(reference, tmp_path, capsys, damage):
    path = tmp_path / "checkpoint.pt"
    data = (reference / "checkpoint.pt").read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"hello world"}[damage]
    )
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(path)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"checkpoint {path} is truncated or corrupt" in line


class _Payload:
    """Unpickling this runs `exec`: what a booby-trapped checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_a_checkpoint_that_would_run_code_is_refused(reference, tmp_path, capsys):
    proof, marker = tmp_path / "proof", tmp_path / "marker"
    state = ckpt.load_checkpoint(reference / "checkpoint.pt")
    torch.save({**state, "extra": _Payload(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)  # what an unsafe load would do
    assert proof.read_text() == "pwned"

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    evil = run / "checkpoint.pt"
    torch.save({**state, "extra": _Payload(marker)}, evil)
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(evil)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"checkpoint {evil} was refused" in line and "could run code" in line
    # resume skips it for the previous checkpoint, with a warning ...
    with pytest.warns(UserWarning, match="was refused"):
        assert ckpt.load_latest(run)[1].name == "checkpoint.prev.pt"
    # ... and with no good one left, refuses to resume
    (run / "checkpoint.prev.pt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, err = _train_cli(capsys, "--resume", str(run), "--no-baseline")
    assert rc == 2 and "was refused" in _error_line(err)
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
    rc, err = _train_cli(
        capsys, "--out", str(tmp_path / "run"), *FAST_ARGS, "--set", f"model.pretrained={path}"
    )
    line = _error_line(err)
    assert rc == 2 and str(path) in line and "weights_only=False" not in line
    assert not marker.exists()


# ----------------------------------------------------------------------------- source guard
_UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def unsafe_loads(source: str) -> list[str]:
    """Calls in `source` that could run code from a file: torch.load without weights_only=True,
    yaml loads other than safe_load, pickle loads, np.load(allow_pickle=True), torch.hub.load."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr, owner = node.func.attr, ast.unparse(node.func.value)
        kwargs = {k.arg: k.value for k in node.keywords}
        true = lambda key: isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value is True  # noqa: E731
        bad = (
            (owner == "torch" and attr == "load" and not true("weights_only"))
            or (owner == "yaml" and attr in _UNSAFE_YAML)
            or (owner in ("pickle", "dill", "cloudpickle", "joblib") and attr in ("load", "loads"))
            or (owner in ("np", "numpy") and attr == "load" and true("allow_pickle"))
            or (owner == "torch.hub" and attr == "load")
        )
        if bad:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _code_of(path: Path) -> str:
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    # IPython magics and shell lines are not Python
    return "\n".join(
        line
        for cell in code
        for line in cell.splitlines()
        if not line.lstrip().startswith(("%", "!"))
    )


def test_every_load_of_a_file_is_safe():
    bad = (
        "torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(t)\nyaml.full_load(t)\n"
        "pickle.loads(b)\nnp.load(p, allow_pickle=True)\ntorch.hub.load('a', 'b')\n"
    )
    assert len(unsafe_loads(bad)) == 7  # the scanner catches each unsafe form
    assert (
        unsafe_loads(
            "torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(t)\nnp.load(p)\n"
        )
        == []
    )
    files = [
        *REPO.glob("msl_kit/**/*.py"),
        *REPO.glob("bench/*.py"),
        *REPO.glob("notebooks/*.ipynb"),
    ]
    assert any(f.name == "checkpoint.py" for f in files)
    problems = {str(f.relative_to(REPO)): unsafe_loads(_code_of(f)) for f in files}
    assert {k: v for k, v in problems.items() if v} == {}
    loaded = [f.name for f in files if "torch.load(" in f.read_text()]
    assert "atomic.py" in loaded  # the guard really sees the loader (models go through it)
