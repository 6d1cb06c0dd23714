"""Unit tests of what-MS-mines views: mining dynamics, snapshots, explorers, live panels, and the
notebook helpers of explore that feed them. Figures are checked for the data they draw."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PathCollection, PolyCollection

from msl_kit import datasets, losses, viz
from msl_kit.losses import MSParams
from msl_kit.notebook import explore, widgets
from msl_kit.train import engine
from msl_kit.train.checkpoint import load_model
from msl_kit.train.config import load_config
from msl_kit.viz import mining as viz_mining

RELEASED = losses.PRESETS["released"]


@pytest.fixture
def history() -> pd.DataFrame:
    """A synthetic history.csv: mining columns every 10 iterations, an evaluation-only row."""
    it = np.arange(10, 160, 10)
    t = it / it.max()
    rows = pd.DataFrame(
        {
            "iteration": it,
            "loss": 1 - 0.5 * t,
            "lr": 1e-3,
            "pos_kept": 1 - 0.6 * t,
            "neg_kept": 0.45 - 0.4 * t,
            "w_pos_mean": 0.18 + 0.1 * t,
            "w_pos_max": 0.3 + 0.3 * t,
            "w_neg_mean": 0.03 + 0.1 * t,
            "w_neg_max": 0.99 + 0 * t,
            "sim_pos_q10": 0.6 + 0 * t,
            "sim_pos_q50": 0.75 + 0 * t,
            "sim_pos_q90": 0.85 + 0 * t,
            "sim_neg_q10": 0.24 - 0.5 * t,
            "sim_neg_q50": 0.5 - 0.5 * t,
            "sim_neg_q90": 0.74 - 0.4 * t,
        }
    )
    extra = pd.DataFrame({"iteration": [155], "loss": [0.4], "recall@1": [0.7]})
    return pd.concat([rows, extra], ignore_index=True)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(4)
    noise = 0.9 * torch.randn(16, 8, generator=g)
    emb = torch.nn.functional.normalize(centres[labels] + noise, dim=1)
    return emb @ emb.T, labels


def _snapshots(batch) -> dict[int, torch.Tensor]:
    """Three "snapshots" of one batch: similarities that separate as training goes."""
    sim, labels = batch
    same = (labels[:, None] == labels[None]).float()
    return {0: 0.3 + 0.6 * sim.clamp(min=0), 50: sim, 150: (sim + 0.4 * same).clamp(max=1)}


# ----------------------------------------------------------------------------- mining dynamics
def test_mining_dynamics_draws_every_mining_column(history):
    fig = viz_mining.mining_dynamics(history, lam=0.5, total=150)
    ax_kept, ax_w, ax_sim = fig.axes
    rows = history.dropna(subset=["pos_kept"])
    it = rows["iteration"].to_numpy()
    kept = [line.get_ydata() for line in ax_kept.lines]
    np.testing.assert_allclose(kept, [100 * rows["pos_kept"], 100 * rows["neg_kept"]])
    np.testing.assert_allclose(ax_kept.lines[0].get_xdata(), it)  # the eval-only row is dropped
    w = {line.get_label(): line.get_ydata() for line in ax_w.lines}
    np.testing.assert_allclose(w["mean w⁺"], rows["w_pos_mean"])
    np.testing.assert_allclose(w["max w⁻"], rows["w_neg_max"])
    assert ax_w.get_yscale() == "log" and len(w) == 4
    bands = [c for c in ax_sim.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # positives and negatives, q10-q90
    for band, kind in zip(bands, ("pos", "neg")):
        ys = band.get_paths()[0].vertices[:, 1]
        assert ys.min() == pytest.approx(rows[f"sim_{kind}_q10"].min())
        assert ys.max() == pytest.approx(rows[f"sim_{kind}_q90"].max())
    medians = {line.get_label(): line.get_ydata() for line in ax_sim.lines}
    np.testing.assert_allclose(medians["negatives median"], rows["sim_neg_q50"])
    assert medians["λ = 0.5"][0] == 0.5
    assert ax_kept.get_xlim() == (0, 150)


def test_mining_history_reads_run_folders_and_refuses_histories_without_mining(history, tmp_path):
    history.to_csv(tmp_path / "history.csv", index=False)
    rows = viz_mining.mining_history(tmp_path)
    assert len(rows) == 15 and rows["iteration"].is_monotonic_increasing
    records = history.dropna(subset=["pos_kept"]).to_dict("records")  # on_step records work too
    assert len(viz_mining.mining_history(records)) == 15
    old = history[["iteration", "loss"]]
    with pytest.raises(ValueError, match="no mining statistics.*pos_kept"):
        viz_mining.mining_dynamics(old)


def test_weights_over_training_shows_each_snapshot_with_its_mined_share(batch):
    sims, labels = _snapshots(batch), batch[1]
    fig = viz_mining.weights_over_training(sims, labels, MSParams(**RELEASED))
    scatter_axes = [
        ax for ax in fig.axes if any(isinstance(c, PathCollection) for c in ax.collections)
    ]
    assert len(scatter_axes) == 3 and sum(bool(ax.images) for ax in fig.axes) == 3
    for ax, (iteration, sim) in zip(scatter_axes, sorted(sims.items())):
        pos, neg = viz_mining.mined_fractions(sim, labels, RELEASED["margin"])
        assert ax.get_title() == (
            f"iteration {iteration}\nmined: {pos:.0%} of positives, {neg:.0%} of negatives"
        )
        w = losses.pair_weights(sim, labels, **RELEASED)
        pos_mask = losses.pair_masks(labels)[0]
        np.testing.assert_allclose(
            ax.collections[0].get_offsets().data[:, 1], w.pos[pos_mask], rtol=1e-6
        )
    kept_pos, _ = losses.mined_pairs(sims[150], labels, margin=0.1)
    assert viz_mining.mined_fractions(sims[150], labels, 0.1)[0] == kept_pos.sum() / 48


# ----------------------------------------------------------------------------- explorers
def _count_pair_weights(monkeypatch) -> list:
    calls = []
    real = losses.ms_pair_weights
    monkeypatch.setattr(widgets, "ms_pair_weights", lambda *a: calls.append(1) or real(*a))
    return calls


def test_the_explorer_computes_the_weights_once_per_slider_move(batch, monkeypatch):
    sim, labels = batch
    explorer = widgets.pair_weight_explorer(sim, labels, compare=False)
    calls = _count_pair_weights(monkeypatch)
    explorer.widget()
    explorer._ui["sliders"]["beta"].value = 90.0
    assert len(calls) == 1
    explorer.apply_preset("paper")
    assert len(calls) == 2


def test_snapshot_explorer_redraws_the_same_batch_at_another_iteration(batch, monkeypatch):
    sims, labels = _snapshots(batch), batch[1]
    explorer = widgets.SnapshotExplorer(sims, labels, MSParams(**RELEASED))
    assert explorer.iterations == [0, 50, 150] and explorer.iteration == 150  # the trained end
    box = explorer.widget()
    assert explorer.widget() is box
    slider, image = explorer._ui["slider"], explorer._ui["image"]
    before, renders = image.value, explorer.renders
    calls = _count_pair_weights(monkeypatch)
    slider.value = 0
    assert explorer.renders == renders + 1 and len(calls) == 1 and image.value != before
    torch.testing.assert_close(
        explorer.weights.neg, losses.pair_weights(sims[0], labels, **RELEASED).neg
    )
    assert "iteration 0" in explorer.figure._suptitle.get_text()
    hist_ax = explorer.figure.axes[0]
    assert hist_ax.get_xlim() == pytest.approx(explorer.sim_range)  # one axis for all snapshots
    with pytest.raises(ValueError, match="no snapshot at iteration 7"):
        explorer.update(7)
    with pytest.raises(ValueError, match="no snapshot"):
        widgets.SnapshotExplorer({}, labels, MSParams(**RELEASED))


# ----------------------------------------------------------------------------- live mining panel
def test_live_mining_keeps_the_mining_records_and_draws_them(history, monkeypatch):
    import IPython.display

    shown, updates = [], []

    class Handle:
        def update(self, obj):
            updates.append(obj)

    monkeypatch.setattr(
        IPython.display, "display", lambda obj, display_id=False: shown.append(obj) or Handle()
    )
    live = widgets.LiveMining(display=True, min_interval=0)
    live.on_start(load_config(), 0, 150)
    assert live.lam == 0.5 and len(shown) == 1  # the note while nothing is recorded
    for record in history.iloc[[0, 1, 2, 15]].to_dict("records"):  # 3 logs, an eval-only row
        if np.isnan(record.get("pos_kept", np.nan)):
            record = {"iteration": record["iteration"], "loss": record["loss"]}
        live.on_step(record)
    live.on_end({})
    assert len(live.records) == 3 and live.draws == len(updates) == 4  # 3 records and the end
    ax_kept = live.figure().axes[0]
    np.testing.assert_allclose(ax_kept.lines[0].get_ydata(), 100 * history["pos_kept"][:3])
    assert ax_kept.get_xlim() == (0, 150)
    assert "log_every" in widgets.LiveMining(display=False).figure().texts[0].get_text()


# ----------------------------------------------------------------------------- a real tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """4 iterations of the digits smoke config: snapshots at 0, 2 and 4."""
    cfg = load_config(
        "digits",
        [
            "train.iterations=4",
            "train.eval_every=2",
            "train.log_every=1",
            "model.embedding_dim=16",
            "model.convnet.width=16",
        ],
    )
    runs = tmp_path_factory.mktemp("runs")
    engine.train(cfg, runs / "tiny")
    return runs / "tiny"


def test_snapshot_similarities_are_one_batch_under_each_snapshot(tiny_run):
    sims, labels = explore.snapshot_similarities(tiny_run, n_classes=3, per_class=2)
    assert list(sims) == [0, 2, 4] and labels.tolist() == sorted(labels.tolist())
    assert torch.bincount(labels).max() == 2 and len(labels.unique()) == 3
    model, cfg = load_model(tiny_run)  # the final checkpoint is iteration 4
    final, same_labels = explore.batch_similarity(model, cfg, n_classes=3, per_class=2)
    torch.testing.assert_close(sims[4], final) and torch.equal(labels, same_labels)
    assert not torch.allclose(sims[0], sims[4])
    with pytest.raises(FileNotFoundError, match="keep_snapshots"):
        explore.snapshot_similarities(tiny_run / "nowhere")


def test_pick_model_takes_the_latest_run_or_says_it_is_fresh(tiny_run, tmp_path):
    picked = explore.pick_model(runs=tiny_run.parent)
    assert picked.run == tiny_run and picked.note.startswith("trained model from")
    assert "iteration 4, R@1" in picked.note
    fresh = explore.pick_model(runs=tmp_path, cfg=load_config("digits"))
    assert fresh.run is None and "FRESH, untrained convnet on digits" in fresh.note
    assert explore.ms_params(fresh.cfg) == MSParams(**RELEASED)


# ----------------------------------------------------------------------------- data (01, 04)
def test_class_groups_and_one_class_per_alphabet_in_the_grid():
    splits = {s: datasets.build("omniglot_small", None, s) for s in ("train", "test")}
    groups = viz.class_groups(splits)
    per_split = groups.groupby("split")[["classes", "images"]].sum()
    assert per_split.loc["train"].tolist() == [130, 2600]
    assert per_split.loc["test"].tolist() == [112, 2240]
    assert groups.groupby("split").size().tolist() == [4, 4]  # alphabets, never shared
    train, test = (set(groups[groups.split == s].group) for s in ("train", "test"))
    assert not train & test
    fig = viz.sample_grid(splits, per_class=2, max_classes=4, one_per_group=True)
    names = [ax.get_ylabel().split("\n")[1] for ax in fig.axes[::2]]
    assert len(names) == 8 and len({n.split()[0] for n in names}) == 8  # 8 different alphabets


def test_split_embeddings_can_take_a_few_whole_classes():
    cfg = load_config("digits", ["model.embedding_dim=16", "model.convnet.width=16"])
    model, _ = load_model(cfg=cfg)
    emb, labels, images = explore.split_embeddings(model, cfg, max_classes=2, seed=1)
    test = datasets.build("digits", None, "test")
    assert len(labels.unique()) == 2 and len(emb) == len(images)
    assert len(labels) == sum(int((test.labels == c).sum()) for c in labels.unique())
