"""Queries without a relevant item (eval.lone_queries: count as misses or skip them) and the
Euclidean metric: exact kNN with ties to the lower index, and both options carried from the
config into metrics.json, evaluate and every table."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import FAST_ARGS, run_cli

from msl_kit import metrics
from msl_kit.reports import paper


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
    rc, printed = run_cli(capsys, "train", "--out", str(out), *FAST_ARGS, *extra)
    assert rc == 0
    assert "eval.lone_queries=skip" in printed and "Euclidean" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["lone_queries"] == "skip" and saved["metric"] == "euclidean"
    assert set(paper.results_table(out)["lone_queries"]) == {"skip"}
    assert paper.load_run(out)["lone_queries"] == "skip"
    rc, printed = run_cli(
        capsys, "evaluate", "--checkpoint", str(out / "best.pt"), "--lone-queries", "miss"
    )
    assert rc == 0 and "eval.lone_queries=miss" in printed
    assert json.loads((out / "metrics_eval.json").read_text())["lone_queries"] == "miss"
    rc, line = run_cli(capsys, "train", "--out", str(tmp_path / "b"), "--set", "eval.metric=cos")
    assert rc == 2 and "eval.metric" in line


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
