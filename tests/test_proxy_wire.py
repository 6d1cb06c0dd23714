"""Proxy-Anchor wired into training: config keys and their checks, the proxies' optimizer group,
labels 0..C-1, shuffled batches, backbone warm-up, gradient clipping, the loss in checkpoints,
and a short run on the embedded default."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msl_kit.cli import app as cli
from msl_kit.losses.proxy_anchor import ProxyAnchorLoss
from msl_kit.losses.registry import loss_spec
from msl_kit.sampler import RandomBatchSampler
from msl_kit.train import distributed, recipe
from msl_kit.train.checkpoint import load_checkpoint
from msl_kit.train.config import load_config
from msl_kit.train.trainer import Trainer
from msl_kit.train.validation import ConfigError

# digits.yaml sets MS's alpha 2 (loss.ms.alpha): a proxy run on it has Proxy-Anchor's own 32.
PROXY = ["loss.name=proxy_anchor", "train.threads=1"]


def test_registry_entry_and_the_losss_own_defaults():
    from msl_kit import losses

    assert losses.ProxyAnchorLoss is ProxyAnchorLoss  # issue 24: the package exports it
    spec = loss_spec("proxy_anchor")
    assert spec.cls is ProxyAnchorLoss and not spec.pairs and spec.needs_classes
    cfg = load_config(None, ["loss.name=proxy_anchor"])
    own = (cfg.loss.params.alpha, cfg.loss.params.margin)
    assert own == (32.0, 0.1), "the paper's scale, not MS's alpha 2"
    cfg = load_config(None, ["loss.proxy_anchor.alpha=16", "loss.name=proxy_anchor"])
    assert cfg.loss.params.alpha == 16.0, "a key the user set wins over the loss's default"
    assert load_config(None).loss.params.alpha == 2.0, "MS keeps its own numbers"


def test_loss_gets_the_train_splits_classes_and_the_embedding_size():
    cfg = load_config("digits", [*PROXY, "model.embedding_dim=24", "data.val_fraction=0.4"])
    train = recipe.dataset(cfg, "train")
    assert sorted(np.unique(train.labels)) == list(range(len(train.classes))), "labels 0..C-1"
    loss = recipe.build_loss(cfg, recipe.num_classes(train))
    assert isinstance(loss, ProxyAnchorLoss)
    assert (loss.num_classes, loss.dim, loss.alpha) == (3, 24, 32.0)  # digits 0-4 minus 2 for val
    with pytest.raises(ValueError, match="one proxy per class"):
        recipe.build_loss(cfg)


def test_labels_outside_0_to_c_minus_1_are_refused():
    class Gappy:
        labels = np.array([0, 1, 3, 3])

    with pytest.raises(ValueError, match="0..C-1"):
        recipe.num_classes(Gappy())


def test_optimizer_groups_and_their_learning_rates():
    cfg = load_config("digits", [*PROXY, "train.optimizer=adamw", "loss.proxy_lr_mult=50"])
    model, loss = recipe.build_model(cfg), ProxyAnchorLoss(5, 64)
    opt = recipe.build_optimizer(model, cfg, loss)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"backbone": 1e-3, "head": 1e-3, "loss": pytest.approx(5e-2)}
    assert opt.param_groups[-1]["params"] == [loss.proxies]
    plain = recipe.build_optimizer(model, load_config("digits"), torch.nn.Module())
    assert type(plain) is torch.optim.Adam and len(plain.param_groups) == 2, "no empty group"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.optimizer=sgd", "train.optimizer"),
        ("train.sampler=balanced", "train.sampler"),
        ("train.grad_clip_value=-1", "train.grad_clip_value"),
        ("train.grad_clip_norm=-0.5", "train.grad_clip_norm"),
        ("train.grad_clip_norm=.inf", "train.grad_clip_norm"),
        ("loss.proxy_lr_mult=-1", "loss.proxy_lr_mult"),
        ("loss.proxy_lr_mult=.nan", "loss.proxy_lr_mult"),
        ("train.warmup_frozen=-1", "train.warmup_frozen"),
        ("train.warmup_frozen=401", "train.warmup_frozen"),  # digits trains 400 iterations
        ("loss.xbm_size=100", "loss.xbm_size"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("digits", ["loss.name=proxy_anchor", override])
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message
    if key == "loss.xbm_size":
        assert "proxies, not pairs" in message, "say why XBM does not apply"


def test_random_sampler_shuffles_epochs_drops_the_rest_and_resumes():
    sampler = RandomBatchSampler(23, 5, seed=3, iterations=9)
    batches = list(sampler)
    assert len(batches) == 9 and all(len(b) == 5 for b in batches)
    for epoch in (batches[:4], batches[4:8]):  # 23 // 5 = 4 batches an epoch, 3 items dropped
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 20 and set(flat) <= set(range(23))
    assert batches[:4] != batches[4:8], "each epoch reshuffles"
    assert list(RandomBatchSampler(23, 5, seed=3, iterations=9, start=6)) == batches[6:]
    ranks = [
        list(RandomBatchSampler(23, 6, 3, iterations=2, num_replicas=2, rank=r)) for r in (0, 1)
    ]
    whole = list(RandomBatchSampler(23, 6, 3, iterations=2))
    assert [a + b for a, b in zip(*ranks)] == whole, "DDP ranks split the global batch"
    with pytest.raises(ValueError, match="lower train.batch_size"):
        RandomBatchSampler(4, 5)


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = load_config(
        "digits", [*PROXY, "eval.floors=false", "train.keep_snapshots=false", *overrides]
    )
    (tmp_path / "run").mkdir()
    return Trainer(cfg, tmp_path / "run", distributed.init_distributed())


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_warmup_frozen_trains_only_head_and_proxies_first(tmp_path):
    run = _trainer(tmp_path, "train.warmup_frozen=2", "train.sampler=random")
    start = (_params(run.model.backbone), _params(run.model.head), _params(run.loss_fn))
    batches = iter(run.loader)
    for _ in range(2):
        run.step(*next(batches))
    warm = (_params(run.model.backbone), _params(run.model.head), _params(run.loss_fn))
    assert all(torch.equal(a, b) for a, b in zip(start[0], warm[0])), "backbone frozen"
    assert not torch.equal(start[1][0], warm[1][0]) and not torch.equal(start[2][0], warm[2][0])
    run.step(*next(batches))
    assert not all(torch.equal(a, p) for a, p in zip(warm[0], run.model.backbone.parameters()))


@pytest.mark.parametrize("key", ["grad_clip_value", "grad_clip_norm"])
def test_gradients_are_clipped_model_and_proxies(tmp_path, key):
    run = _trainer(tmp_path, f"train.{key}=0.5")
    params = run._params()
    assert any(p is run.loss_fn.proxies for p in params)
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    run._adjust_grads()
    grads = torch.cat([p.grad.flatten() for p in params])
    if key == "grad_clip_value":
        assert grads.abs().max() == 0.5
    else:
        assert float(grads.norm()) == pytest.approx(0.5, rel=1e-4)


def test_short_run_on_the_embedded_default_records_proxies_and_their_lr(tmp_path):
    out = tmp_path / "pa"
    args = ["train", "--out", str(out), "--no-baseline", "--set", "loss.name=proxy_anchor"]
    for s in ["train.iterations=4", "train.eval_every=0", "train.log_every=2", "train.threads=1"]:
        args += ["--set", s]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["recall@1"] <= 1
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert float(rows[0]["lr_loss"]) == pytest.approx(100 * float(rows[0]["lr"]))
    state = load_checkpoint(out / "checkpoint.pt")
    proxies = state["loss"]["proxies"]
    assert proxies.shape[1] == 64 and state["optimizer"]["param_groups"][-1]["name"] == "loss"
    moments = [v["exp_avg"] for v in state["optimizer"]["state"].values()]
    assert any(m.shape == proxies.shape and m.abs().sum() > 0 for m in moments), "proxies trained"


# A child `msl-kit train` that SIGKILLs itself right after a given iteration (no clean-up).
KILLER = """
import os, signal, sys
from msl_kit.cli import app as cli
from msl_kit.train import engine, trainer
at = int(sys.argv[1])
class Killer(trainer.Callback):
    def on_step(self, record):
        if record["iteration"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
real_train = engine.train
engine.train = lambda *a, callbacks=(), **k: real_train(*a, callbacks=[*callbacks, Killer()], **k)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_identical_metrics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    keys = [
        *PROXY,
        "train.iterations=30",
        "train.checkpoint_every=10",
        "train.eval_every=15",
        "train.warmup_frozen=12",  # the checkpoint (10) falls inside the warm-up, the kill after
        "train.optimizer=adamw",
        "train.sampler=random",
        "train.grad_clip_value=10",
    ]
    args = ["train", "--config", "digits", "--no-baseline"]
    for key in keys:
        args += ["--set", key]

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300
        )

    ref, out = tmp_path / "reference", tmp_path / "killed"
    assert run("-m", "msl_kit.cli", *args, "--out", str(ref)).returncode == 0
    child = tmp_path / "child.py"
    child.write_text(KILLER)
    killed = run(str(child), "17", *args, "--out", str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 10
    resumed = run("-m", "msl_kit.cli", "train", "--resume", str(out), "--no-baseline")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text()) == json.loads(
        (ref / "metrics.json").read_text()
    )
    final, want = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(ref / "checkpoint.pt")
    assert torch.equal(final["loss"]["proxies"], want["loss"]["proxies"])


def test_paper_carries_proxy_anchor_with_a_source_for_every_method():
    from msl_kit.reports import paper

    cub = paper.paper_table("cub200", 512).set_index("run")
    assert cub.loc["Proxy-Anchor", "R@1"] == 68.4  # the paper (DESIGN.md)
    assert list(cub.loc["Proxy-Anchor (released model)", ["R@1", "R@2", "R@4", "R@8"]]) == [
        69.1,
        78.9,
        86.1,
        91.2,
    ]
    assert cub.loc["Proxy-Anchor (released model)", "protocol"] == "reported"
    assert {e["method"] for e in paper.PAPER_RESULTS} == set(paper.SOURCES)


def test_proxy_view_weights_are_the_losss_on_all_proxies():
    from msl_kit.losses.proxy_anchor import proxy_anchor_loss, proxy_weights
    from msl_kit.viz.proxies import batch_proxies, proxy_vs_ms_figure

    g = torch.Generator().manual_seed(0)
    emb, labels = (
        torch.randn(12, 8, generator=g),
        torch.tensor([3, 3, 3, 7, 7, 7, 9, 9, 9, 1, 1, 1]),
    )
    proxies = torch.randn(10, 8, generator=g)
    sim, proxy_labels, shown, _ = batch_proxies(emb, labels, proxies)
    assert sim.shape == (12, 10) and shown.tolist() == [1, 3, 7, 9]
    # Scored against all 10 proxies (the negative term's 1/C), not only the batch's four.
    loss = ProxyAnchorLoss(10, 8)
    with torch.no_grad():
        loss.proxies.copy_(proxies)
    s = loss.similarities(emb).detach().requires_grad_()
    proxy_anchor_loss(s, labels).backward()
    w = proxy_weights(sim, proxy_labels)
    torch.testing.assert_close(w.neg - w.pos, s.grad, atol=1e-6, rtol=1e-5)
    stand_in, local, cols, note = batch_proxies(emb, labels)
    assert stand_in.shape == (12, 4) and local.max() == 3 and "class means" in note
    fig = proxy_vs_ms_figure(emb, labels, proxies)
    assert len(fig.axes) == 4 and "10 proxies" in fig.axes[1].get_title()
