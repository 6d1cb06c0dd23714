"""Issue 21, items 7-13: resume after a crash mid-extension, numbers checked where they enter
(config and Python API), messages, MS without mining, lone queries, Euclidean ranking."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from msl_kit import cli, metrics
from msl_kit.losses import (
    MultiSimilarityLoss,
    gpw,  # noqa: I001
    multi_similarity_loss,
)
from msl_kit.reports import paper
from msl_kit.train import engine, rundir, trainer
from msl_kit.train.config import load_config

FAST = [
    "--config",
    "digits",
    *("--set", "train.iterations=6"),
    *("--set", "train.checkpoint_every=2"),
    *("--set", "train.eval_every=0"),
    *("--set", "train.threads=1"),
    *("--set", "eval.floors=false"),
]


def _run(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(list(args))
    captured = capsys.readouterr()
    if rc == 2:
        lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        return rc, lines[0]
    return rc, captured.out + captured.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    assert cli.main(["train", "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def straight10(tmp_path_factory) -> dict:
    """An uninterrupted run asked for 10 iterations from the start."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert cli.main(["train", "--out", str(out), *FAST, "--set", "train.iterations=10"]) == 0
    return json.loads((out / "metrics.json").read_text())


# ----------------------------------------------------------------------------- 7. resume
class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler saves anything."""


@pytest.mark.parametrize("point", ["after the record, before config.yaml", "at iteration 7"])
def test_an_extension_killed_before_its_next_checkpoint_resumes(
    finished, straight10, tmp_path, capsys, monkeypatch, point
):
    """Item 7: `--resume R --set train.iterations=10`, killed before the checkpoint of
    iteration 8, then `--resume R` (no --set) continues to 10 and ends like a straight run."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    real_write = rundir.atomic_write_text
    if point.startswith("after"):

        def write(path, text):
            if Path(path).name == "config.yaml":
                raise Crash
            real_write(path, text)

        monkeypatch.setattr(rundir, "atomic_write_text", write)
        callbacks = []
    else:

        class Killer(trainer.Callback):
            def on_step(self, record):
                if record["iteration"] == 7:
                    raise Crash

        callbacks = [Killer()]
    real_train = engine.train
    monkeypatch.setattr(
        engine, "train", lambda *a, **k: real_train(*a, **{**k, "callbacks": callbacks})
    )
    with pytest.raises(Crash):
        cli.main(["train", "--resume", str(run), "--set", "train.iterations=10"])
    monkeypatch.undo()
    assert (
        not (run / "checkpoint.pt").exists()
        or torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 6
    )
    rc, out = _run(capsys, "train", "--resume", str(run))
    assert rc == 0, out
    got = json.loads((run / "metrics.json").read_text())
    assert got["iteration"] == 10
    assert [r["overrides"] for r in got["resumes"]] == [["train.iterations=10"]]
    assert got["recall@1"] == straight10["recall@1"] and got["map@r"] == straight10["map@r"]
    assert load_config(run / "config.yaml").train.iterations == 10


def test_a_users_edit_after_an_extension_is_still_refused(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert _run(capsys, "train", "--resume", str(run), "--set", "train.iterations=8")[0] == 0
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("beta: 40.0", "beta: 50.0"))
    rc, line = _run(capsys, "train", "--resume", str(run), "--set", "train.iterations=9")
    assert rc == 2 and "was edited" in line and "loss.ms.beta: 40.0 -> 50.0" in line


# ----------------------------------------------------------------------------- 8. config
@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.ms.alpha=.inf", "loss.ms.alpha"),
        ("train.lr=.inf", "train.lr"),
        ("train.head_lr_mult=.nan", "train.head_lr_mult"),
        ("loss.xbm_weight=.nan", "loss.xbm_weight"),
        ("data.crop_scale=[0.5, .nan]", "data.crop_scale"),
        ("seed=-1", "seed"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused_before_any_folder(
    tmp_path, capsys, override, key
):
    out = tmp_path / "run"
    rc, line = _run(capsys, "train", "--out", str(out), *FAST, "--set", override)
    assert rc == 2 and line.startswith(f"error: {key} = ") and "not allowed" in line
    assert not out.exists()


def test_a_val_split_too_small_for_the_batch_leaves_the_out_usable(tmp_path, capsys):
    """Item 8: data.val_fraction=0.5 leaves too few classes for a batch of 5 classes: refused
    before anything is written, and the same --out works once the config is fixed."""
    out = tmp_path / "run"
    bad = ["--set", "data.val_fraction=0.5", "--set", "train.batch_size=50"]
    rc, line = _run(capsys, "train", "--out", str(out), *FAST, *bad)
    assert rc == 2 and "needs 5 classes" in line
    assert not out.exists()
    out.mkdir()  # an empty folder the user made is kept, and accepted
    rc, line = _run(capsys, "train", "--out", str(out), *FAST, *bad)
    assert rc == 2 and out.is_dir() and not any(out.iterdir())
    fixed = ["--set", "data.val_fraction=0.5", "--set", "train.batch_size=20"]
    rc, printed = _run(capsys, "train", "--out", str(out), *FAST, *fixed)
    assert rc == 0 and (out / "metrics.json").is_file(), printed


# ----------------------------------------------------------------------------- 9. Python API
@pytest.mark.parametrize(
    "params, error",
    [
        (dict(alpha=-2.0), ValueError),
        (dict(beta=0.0), ValueError),
        (dict(beta=math.inf), ValueError),
        (dict(beta=1001.0), ValueError),
        (dict(lam=math.nan), ValueError),
        (dict(lam=1.5), ValueError),
        (dict(margin=-0.1), ValueError),
        (dict(alpha=True), TypeError),
        (dict(alpha="2"), TypeError),
    ],
)
def test_ms_loss_checks_its_numbers(params, error):
    name = next(iter(params))
    with pytest.raises(error, match=name) as e:
        MultiSimilarityLoss(**params)
    assert "\n" not in str(e.value)
    x = F.normalize(torch.randn(8, 4), dim=1)
    with pytest.raises(error, match=name):
        multi_similarity_loss(x @ x.T, torch.arange(8) // 2, **params)


@pytest.mark.parametrize(
    "cls, params",
    [
        (gpw.ContrastiveLoss, dict(neg_margin=math.nan)),
        (gpw.ContrastiveLoss, dict(pos_margin=-1.0)),
        (gpw.ContrastiveLoss, dict(mining_margin=math.inf)),
        (gpw.TripletLoss, dict(margin=-0.1)),
        (gpw.BinomialDevianceLoss, dict(alpha=0.0)),
        (gpw.BinomialDevianceLoss, dict(beta=math.inf)),
        (gpw.BinomialDevianceLoss, dict(lam=2.0)),
        (gpw.LiftedStructureLoss, dict(margin=math.nan)),
    ],
)
def test_gpw_losses_check_their_numbers(cls, params):
    with pytest.raises(ValueError, match=next(iter(params))):
        cls(**params)


@pytest.mark.parametrize(
    "ks, error",
    [(1.5, TypeError), (True, TypeError), ([1, True], TypeError), ("1", TypeError)]
    + [([1, 2.0], TypeError), (0, ValueError), ([], ValueError), ([2, -1], ValueError)],
)
def test_recall_ks_is_a_positive_int_or_a_sequence_of_them(ks, error):
    x, y = F.normalize(torch.randn(12, 4), dim=1), torch.arange(12) // 3
    for fn in (metrics.recall_at_k, metrics.retrieval_metrics):
        with pytest.raises(error, match="ks must be") as e:
            fn(x, y, ks=ks)
        assert "\n" not in str(e.value)
    assert metrics.recall_at_k(x, y, ks=2).keys() == {2}


# ----------------------------------------------------------------------------- 10. messages
def test_a_binary_yaml_is_named(tmp_path, capsys):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x80\x03PK\xff\x00binary")
    rc, line = _run(capsys, "train", "--config", str(path), "--out", str(tmp_path / "o"))
    assert rc == 2 and str(path) in line and "not a YAML text file" in line


@pytest.mark.parametrize("body", ["x" * 3_000_000, "loss: {beta: " + "9" * 3_000_000 + "x}"])
def test_a_huge_yaml_error_is_a_short_line(tmp_path, capsys, body):
    path = tmp_path / "huge.yaml"
    path.write_text(body)
    rc, line = _run(capsys, "train", "--config", str(path), "--out", str(tmp_path / "o"))
    assert rc == 2 and len(line) < 2100


def test_evaluate_out_in_a_missing_folder_is_refused_before_evaluating(
    finished, tmp_path, capsys, monkeypatch
):
    def never(*a, **k):
        raise AssertionError("evaluated before checking --out")

    monkeypatch.setattr(engine, "evaluate_checkpoint", never)
    target = tmp_path / "nodir" / "x.json"
    rc, line = _run(
        capsys, "evaluate", "--checkpoint", str(finished / "best.pt"), "--out", str(target)
    )
    assert rc == 2 and str(target) in line and "does not exist" in line and ".tmp" not in line


# ----------------------------------------------------------------------------- 11. no mining
def test_without_mining_an_anchor_without_positive_keeps_its_negative_term():
    """Item 11: a singleton class's anchor adds 1/beta log(1 + sum_neg e^(beta (S - lam)));
    with MS mining it still does not count."""
    x = F.normalize(torch.randn(7, 5, generator=torch.Generator().manual_seed(4)), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 9])  # anchor 6 has no positive
    sim = x @ x.T
    with_lone = MultiSimilarityLoss(mining="none")(x, y) * 7
    without = MultiSimilarityLoss(mining="none").per_anchor(sim, y)[:6].sum()
    neg_term = torch.log1p(torch.exp(40.0 * (sim[6, :6] - 0.5)).sum()) / 40.0
    assert torch.isclose(with_lone, without + neg_term, rtol=1e-5)
    assert MultiSimilarityLoss().per_anchor(sim, y)[6] == 0  # MS mining: the rule stays


# ----------------------------------------------------------------------------- 12. lone
@pytest.mark.filterwarnings("ignore:.*no relevant item")
def test_lone_queries_miss_or_skip():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    y = torch.tensor([0, 0, 1, 1, 5])  # the last query has no relevant item
    assert metrics.recall_at_k(x, y, ks=1) == {1: 0.8}
    assert metrics.recall_at_k(x, y, ks=1, lone_queries="skip") == {1: 1.0}
    with pytest.warns(UserWarning, match="left out of Recall@K"):
        metrics.retrieval_metrics(x, y, ks=1, lone_queries="skip")
    with pytest.raises(ValueError, match="lone_queries must be one of 'miss', 'skip'"):
        metrics.recall_at_k(x, y, lone_queries="drop")


def test_lone_queries_and_metric_reach_metrics_json_and_every_table(tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--set", "eval.lone_queries=skip", "--set", "eval.metric=euclidean"]
    rc, printed = _run(capsys, "train", "--out", str(out), *FAST, *extra)
    assert rc == 0
    assert "eval.lone_queries=skip" in printed and "Euclidean" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["lone_queries"] == "skip" and saved["metric"] == "euclidean"
    assert set(paper.results_table(out)["lone_queries"]) == {"skip"}
    assert paper.load_run(out)["lone_queries"] == "skip"
    rc, printed = _run(
        capsys, "evaluate", "--checkpoint", str(out / "best.pt"), "--lone-queries", "miss"
    )
    assert rc == 0 and "eval.lone_queries=miss" in printed
    assert json.loads((out / "metrics_eval.json").read_text())["lone_queries"] == "miss"
    rc, line = _run(capsys, "train", "--out", str(tmp_path / "b"), "--set", "eval.metric=cos")
    assert rc == 2 and "eval.metric" in line


# ----------------------------------------------------------------------------- 13. euclidean
def naive_euclidean_knn(q: torch.Tensor, g: torch.Tensor, k: int, exclude_self: bool):
    """Sort every gallery item by (squared distance, index), in float64."""
    d = ((q.double()[:, None] - g.double()[None]) ** 2).sum(-1)
    if exclude_self:
        d.fill_diagonal_(math.inf)
    rows = [sorted(range(len(g)), key=lambda j: (d[i, j].item(), j))[:k] for i in range(len(q))]
    return torch.tensor(rows)


@pytest.mark.parametrize("block_size", [None, 3, 7])
def test_euclidean_knn_is_exact_with_ties_by_lower_index(block_size):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (23, 3), generator=g).float()  # small integers: many exact ties
    ours = metrics.knn(x, 6, block_size=block_size, metric="euclidean")[1]
    assert torch.equal(ours, naive_euclidean_knn(x, x, 6, True))
    q = torch.randint(-3, 4, (9, 3), generator=g).float()
    ours = metrics.knn(q, 5, x, block_size=block_size, metric="euclidean")[1]
    assert torch.equal(ours, naive_euclidean_knn(q, x, 5, False))


def test_euclidean_differs_from_inner_product_on_unnormalised_features():
    x = torch.tensor([[1.0, 0.0], [10.0, 0.0], [1.1, 0.1]])
    y = torch.tensor([0, 1, 0])
    assert metrics.recall_at_k(x, y, ks=1, metric="ip") == {1: 0.0}
    assert metrics.recall_at_k(x, y, ks=1, metric="euclidean")[1] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="metric must be one of 'ip', 'euclidean'"):
        metrics.knn(x, 1, metric="cosine")
