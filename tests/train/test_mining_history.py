"""Issue 14: every run's history.csv carries what MS mined in the very batch it trained on."""

from __future__ import annotations

import csv

import torch

from msl_kit import losses
from msl_kit.losses.mining import STAT_KEYS as MINING_COLUMNS
from msl_kit.train import engine
from msl_kit.train.config import load_config


class _Recording(torch.nn.Module):
    """The configured MS loss, keeping each batch's embeddings and labels."""

    def __init__(self) -> None:
        super().__init__()
        self.ms, self.batches = losses.MultiSimilarityLoss(), []

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.batches.append((emb.detach().clone(), labels.clone()))
        return self.ms(emb, labels)


def test_history_mining_columns_equal_pair_weights_of_the_same_batch(tmp_path):
    cfg = load_config(
        "digits",
        ["train.iterations=4", "train.log_every=2", "train.eval_every=0", "eval.floors=false"],
    )
    loss = _Recording()
    engine.train(cfg, tmp_path / "run", loss_fn=loss)
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [2, 4]
    assert set(MINING_COLUMNS) <= set(rows[0])
    params = losses.PRESETS["released"]
    for row in rows:
        emb, labels = loss.batches[int(row["iteration"]) - 1]
        sim = emb @ emb.T
        w = losses.pair_weights(sim, labels, **params)
        same = labels[:, None] == labels[None, :]
        pos = same & ~torch.eye(len(labels), dtype=torch.bool)
        neg = ~same
        kept_pos = (w.pos > 0) & pos
        kept_neg = (w.neg > 0) & neg
        assert float(row["pos_kept"]) == pytest_approx(kept_pos.sum() / pos.sum())
        assert float(row["neg_kept"]) == pytest_approx(kept_neg.sum() / neg.sum())
        if kept_pos.any():
            assert float(row["w_pos_max"]) == pytest_approx(w.pos[kept_pos].max())
            assert float(row["w_pos_mean"]) == pytest_approx(w.pos[kept_pos].mean())
        assert float(row["sim_neg_q50"]) == pytest_approx(sim[neg].quantile(0.5))


def pytest_approx(value) -> object:
    import pytest

    return pytest.approx(float(value), rel=1e-4, abs=1e-6)
