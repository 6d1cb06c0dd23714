"""A diverging run (NaN or inf loss, gradient, embeddings) stops before any weight changes,
keeps its last good checkpoint and says what to try, in one line from the CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import FAST, FAST_ARGS, error_line, run_cli
from torch import nn
from torch.utils.data import Dataset

from msl_kit import datasets, losses
from msl_kit.train import checkpoint as ckpt
from msl_kit.train import engine, recipe, trainer
from msl_kit.train.config import load_config

NAN = float("nan")


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
    rc, err = run_cli(
        capsys,
        "train",
        "--out",
        str(out),
        *FAST_ARGS,
        "--set",
        "train.lr=1e30",
        "--set",
        "train.checkpoint_every=1",
    )
    line = error_line(err)
    assert rc == 1
    assert "became NaN or inf at iteration 2" in line and "Try a lower train.lr" in line
    assert str(out / "checkpoint.pt") in line
    state = ckpt.load_checkpoint(out / "checkpoint.pt")  # iteration 1, before the blow-up
    assert state["iteration"] == 1 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )
