"""Unit tests of msl_kit.viz, viz_mining, widgets and explore: figures hold the data they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgba
from matplotlib.offsetbox import AnnotationBbox
from sklearn.decomposition import PCA

from msl_kit import datasets, losses, viz
from msl_kit.losses.proxy_anchor import ProxyAnchorLoss
from msl_kit.losses.registry import LOSSES
from msl_kit.notebook import explore, widgets
from msl_kit.train import engine, recipe
from msl_kit.train.checkpoint import load_model, save_checkpoint
from msl_kit.train.config import load_config, to_dict
from msl_kit.viz import mining as viz_mining

RELEASED = losses.PRESETS["released"]


@pytest.fixture
def batch():
    """A 4 classes x 4 batch of unit vectors around class centres: sim (16, 16), sorted labels."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(4)
    noise = 0.9 * torch.randn(16, 8, generator=g)
    emb = torch.nn.functional.normalize(centres[labels] + noise, dim=1)
    return emb @ emb.T, labels


def naive_mining(sim, labels, margin):
    """DESIGN.md's mining rule, one anchor at a time."""
    n = len(labels)
    kept_pos, kept_neg = np.zeros((n, n), bool), np.zeros((n, n), bool)
    for i in range(n):
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [k for k in range(n) if labels[k] != labels[i]]
        min_pos, max_neg = min(sim[i, j] for j in pos), max(sim[i, k] for k in neg)
        kp = [j for j in pos if sim[i, j] - margin < max_neg]
        kn = [k for k in neg if sim[i, k] + margin > min_pos]
        if kp and kn:
            kept_pos[i, kp], kept_neg[i, kn] = True, True
    return kept_pos, kept_neg


def scatter_points(ax):
    return [c.get_offsets().data for c in ax.collections if isinstance(c, PathCollection)]


# ------------------------------------------------------------------------ similarities and weights
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.3])
def test_mined_pairs_follow_the_design_rule(batch, margin):
    sim, labels = batch
    kept_pos, kept_neg = losses.mined_pairs(sim, labels, margin=margin)  # what the histograms fill
    ref_pos, ref_neg = naive_mining(sim.numpy(), labels.numpy(), margin)
    np.testing.assert_array_equal(kept_pos.numpy(), ref_pos)
    np.testing.assert_array_equal(kept_neg.numpy(), ref_neg)
    # the loss weighs exactly these
    w = losses.pair_weights(sim, labels, **{**RELEASED, "margin": margin})
    np.testing.assert_array_equal((w.pos > 0).numpy(), ref_pos)
    np.testing.assert_array_equal((w.neg > 0).numpy(), ref_neg)


def test_similarity_heatmap_shows_the_matrix_with_class_ticks(batch):
    sim, labels = batch
    ax = viz_mining.similarity_heatmap(sim, labels).axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), sim.numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    np.testing.assert_allclose(ax.get_xticks(), [1.5, 5.5, 9.5, 13.5])


def test_similarity_histograms_count_pairs_and_draw_thresholds(batch):
    sim, labels = batch
    s, y = sim.numpy(), labels.numpy()
    ax = viz_mining.similarity_histograms(sim, labels, lam=0.5, margin=0.1).axes[0]
    ref_pos, ref_neg = naive_mining(s, y, 0.1)
    pos = (y[:, None] == y[None]) & ~np.eye(16, dtype=bool)
    outlines = [p for p in ax.patches if p.get_fill() is False]  # all positives, all negatives
    assert [p.get_edgecolor()[:3] for p in outlines] == [
        to_rgba(viz.POS_COLOR)[:3],
        to_rgba(viz.NEG_COLOR)[:3],
    ]
    mined_pos, mined_neg = ax.containers  # filled bars: the mined pairs
    assert sum(r.get_height() for r in mined_pos) == ref_pos.sum()
    assert sum(r.get_height() for r in mined_neg) == ref_neg.sum()
    xs = sorted(line.get_xdata()[0] for line in ax.lines)
    min_pos = np.where(pos, s, np.inf).min(1)
    max_neg = np.where(~(y[:, None] == y[None]), s, -np.inf).max(1)
    expected = sorted([0.5, np.median(min_pos) - 0.1, np.median(max_neg) + 0.1])
    np.testing.assert_allclose(xs, expected, rtol=1e-6)


def test_weight_scatter_plots_each_pairs_weight_against_its_similarity(batch):
    sim, labels = batch
    w = losses.pair_weights(sim, labels, **RELEASED)
    pos_pts, neg_pts = scatter_points(viz_mining.weight_scatter(sim, labels, w).axes[0])
    pos = (labels[:, None] == labels[None]) & ~torch.eye(16, dtype=torch.bool)
    np.testing.assert_allclose(pos_pts, np.stack([sim[pos], w.pos[pos]], 1), rtol=1e-6)
    neg = ~pos & ~torch.eye(16, dtype=torch.bool)
    np.testing.assert_allclose(neg_pts, np.stack([sim[neg], w.neg[neg]], 1), rtol=1e-6)


def test_weight_scatter_says_when_nothing_is_mined():
    emb = torch.eye(4)[[0, 0, 1, 1]]  # classes perfectly apart: MS mines nothing
    sim, labels = emb @ emb.T, torch.tensor([0, 0, 1, 1])
    w = losses.pair_weights(sim, labels, **RELEASED)
    ax = viz_mining.weight_scatter(sim, labels, w).axes[0]
    assert any("no pair mined" in t.get_text() for t in ax.texts)


def test_weight_heatmap_is_pos_minus_neg(batch):
    sim, labels = batch
    w = losses.pair_weights(sim, labels, **RELEASED)
    image = viz_mining.weight_heatmap(w, labels).axes[0].images[0]
    np.testing.assert_allclose(image.get_array(), (w.pos - w.neg).numpy())
    vmin, vmax = image.get_clim()
    assert vmin == -vmax == -float((w.pos - w.neg).abs().max())


def test_gpw_figure_shows_every_loss_with_its_own_weights(batch):
    sim, labels = batch
    fig = viz_mining.gpw_figure(sim, labels)
    names = [n for n, spec in LOSSES.items() if spec.pairs]  # proxy losses have their own view
    scatter_axes = [ax for ax in fig.axes if scatter_points(ax)]
    heat_axes = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in scatter_axes] == [LOSSES[n].title for n in names]
    assert len(heat_axes) == len(names)
    pos = ((labels[:, None] == labels[None]) & ~torch.eye(16, dtype=torch.bool)).numpy()
    for name, ax in zip(names, scatter_axes):
        params = RELEASED if name == "ms" else {}
        w = losses.gpw_pair_weights(name, sim, labels, **params)
        np.testing.assert_allclose(
            scatter_points(ax)[0][:, 1], w.pos.numpy()[pos], rtol=1e-5, atol=1e-7
        )
    # the MS column is the closed-form pair_weights, not only an autograd result
    np.testing.assert_allclose(
        scatter_points(scatter_axes[0])[1][:, 1],
        losses.pair_weights(sim, labels, **RELEASED).neg.numpy()[~pos & ~np.eye(16, dtype=bool)],
        rtol=1e-5,
        atol=1e-7,
    )


# ----------------------------------------------------------------------------- the explorer
def test_explorer_update_recomputes_weights_and_figure(batch):
    sim, labels = batch
    explorer = widgets.pair_weight_explorer(sim, labels, compare=False)
    first = explorer.figure
    assert explorer.preset == "released"
    fig = explorer.update(beta=120.0, margin=0.2)
    assert fig is explorer.figure and fig is not first
    expected = losses.pair_weights(sim, labels, **{**RELEASED, "beta": 120.0, "margin": 0.2})
    torch.testing.assert_close(explorer.weights.neg, expected.neg)
    assert explorer.preset == "custom"
    assert "β=120" in fig._suptitle.get_text()
    explorer.apply_preset("paper")
    assert explorer.params == losses.PRESETS["paper"] and explorer.preset == "paper"
    with pytest.raises(ValueError, match="unknown parameter"):
        explorer.update(gamma=1.0)


def test_explorer_widget_redraws_in_place_when_a_slider_moves(batch):
    sim, labels = batch
    explorer = widgets.pair_weight_explorer(sim, labels)
    box = explorer.widget()
    assert explorer.widget() is box  # built once
    ui = explorer._ui
    before, before_compare, renders = ui["image"].value, ui["compare"].value, explorer.renders
    ui["sliders"]["beta"].value = 90.0
    assert explorer.renders == renders + 1
    assert explorer.params["beta"] == 90.0
    assert ui["image"].value != before
    assert ui["compare"].value == before_compare  # the other losses do not depend on MS's sliders
    assert [ax.get_title() for ax in explorer.compare_figure.axes if scatter_points(ax)] == [
        LOSSES[n].title for n in ("contrastive", "triplet", "binomial", "lifted")
    ]
    assert ui["image"].value[:8] == b"\x89PNG\r\n\x1a\n"
    assert ui["preset"].value == "custom"
    ui["preset"].value = "paper"  # one redraw for four parameters; sliders follow
    assert explorer.renders == renders + 2
    assert {n: s.value for n, s in ui["sliders"].items()} == pytest.approx(losses.PRESETS["paper"])
    ui["preset"].value = "custom"  # choosing "custom" changes nothing
    assert explorer.renders == renders + 2


# ----------------------------------------------------------------------------- live curves
def test_live_curves_record_and_plot_without_a_notebook():
    live = widgets.LiveCurves()
    assert live.display is False  # plain Python: nothing to draw into
    live.on_start(None, 0, 30)
    for i in range(1, 31):
        live.on_step({"iteration": i, "loss": 1.0 / i, "lr": 1e-3, "images_per_s": 1.0})
        if i % 10 == 0:
            live.on_eval(i, {"recall@1": i / 40, "map@r": i / 80})
    live.on_end({})
    assert live.draws == 0
    ax_loss, ax_eval = live.figure().axes
    np.testing.assert_allclose(ax_loss.lines[0].get_ydata(), [1.0 / i for i in range(1, 31)])
    labels = [line.get_label() for line in ax_eval.lines]
    assert labels == ["recall@1", "map@r"]
    np.testing.assert_allclose(ax_eval.lines[0].get_xdata(), [10, 20, 30])
    np.testing.assert_allclose(ax_eval.lines[0].get_ydata(), [25.0, 50.0, 75.0])


def test_live_curves_update_one_display_in_place(monkeypatch):
    import IPython.display

    updates = []

    class Handle:
        def update(self, obj):
            updates.append(obj)

    shown = []
    monkeypatch.setattr(
        IPython.display, "display", lambda obj, display_id=False: shown.append(obj) or Handle()
    )
    live = widgets.LiveCurves(display=True, min_interval=3600)
    live.on_start(None, 0, 4)
    for i in range(1, 5):
        live.on_step({"iteration": i, "loss": 0.5})
    live.on_eval(4, {"recall@1": 0.9})
    live.on_end({})
    assert len(shown) == 1  # one output, updated in place
    assert live.draws == len(updates) == 2  # the evaluation and the end; steps wait min_interval
    assert all(u.data[:4] == b"\x89PNG" for u in updates)


def test_live_curves_follow_a_real_training_run(tmp_path):
    cfg = load_config(
        None,
        [
            "train.iterations=4",
            "train.eval_every=2",
            "train.log_every=1",
            "model.embedding_dim=16",
            "model.convnet.width=16",
        ],
    )
    live = widgets.LiveCurves(display=False)
    results = engine.train(cfg, tmp_path / "run", callbacks=[live])
    assert [i for i, _ in live.steps] == [1, 2, 3, 4]
    assert [i for i, _ in live.evals] == [2, 4]
    assert live.evals[-1][1]["recall@1"] == results["recall@1"]
    fig = viz.recall_curves(tmp_path / "run")
    np.testing.assert_allclose(fig.axes[0].lines[0].get_xdata(), [2, 4])
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata()[-1], 100 * results["recall@1"])


# ------------------------------------------------------------------------ embeddings and retrieval
def test_pca_projection_matches_scikit_learn():
    x = np.random.default_rng(0).normal(size=(50, 6)) * [5, 3, 1, 1, 1, 1]
    ours = viz.embedding_2d(torch.as_tensor(x, dtype=torch.float32), "pca")
    ref = PCA(2).fit_transform(x)
    for c in range(2):  # equal up to the sign of each component
        same, flipped = np.abs(ours[:, c] - ref[:, c]).max(), np.abs(ours[:, c] + ref[:, c]).max()
        assert min(same, flipped) < 1e-3
    with pytest.raises(ValueError, match="umap"):
        viz.embedding_2d(x, "tsne")


@pytest.mark.slow
def test_umap_keeps_separated_classes_apart():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 40)
    x = np.eye(16)[labels * 4] * 3 + rng.normal(size=(160, 16)) * 0.3
    points = viz.embedding_2d(x, "umap", seed=0)
    assert points.shape == (160, 2) and np.isfinite(points).all()
    d = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(160) * 1e9
    assert (labels[d.argmin(1)] == labels).mean() > 0.95


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_umaps_neighbour_graph_is_the_exact_one_with_each_point_first(metric):
    from sklearn.neighbors import NearestNeighbors

    x = np.random.default_rng(2).normal(size=(300, 12)).astype(np.float32)
    idx, dists = viz.figures.exact_knn_graph(x, 15, metric)
    ref_d, ref_i = NearestNeighbors(n_neighbors=15, metric=metric).fit(x).kneighbors(x)
    assert idx.dtype == np.int32 and dists.dtype == np.float32 and idx.shape == (300, 15)
    assert (idx[:, 0] == np.arange(300)).all() and (dists[:, 0] == 0).all()
    np.testing.assert_array_equal(idx, ref_i)  # random data: no ties
    np.testing.assert_allclose(dists, ref_d, atol=1e-5)
    # another metric, or too many points for an exact search: UMAP searches itself
    assert viz.figures.exact_knn_graph(x, 15, "correlation") == (None, None, None)
    assert viz.figures.exact_knn_graph(x[:1], 15, metric) == (None, None, None)


def test_spread_points_are_far_apart_and_distinct():
    pts = np.random.default_rng(1).uniform(size=(500, 2))
    chosen = viz.spread_points(pts, 12)
    assert len(chosen) == len(set(chosen)) == 12
    d = np.linalg.norm(pts[chosen][:, None] - pts[chosen][None], axis=-1) + np.eye(12)
    assert d.min() > 0.08 * np.ptp(pts, 0).max()
    assert len(viz.spread_points(pts[:5], 12)) <= 5  # never more than there are
    crowded = np.r_[np.zeros((50, 2)), [[1.0, 1.0]]]  # 50 points on one spot: only 2 places apart
    chosen = viz.spread_points(crowded, 10)
    assert len(chosen) == 2 and 50 in chosen


def test_embedding_figure_colours_by_class_and_places_thumbnails():
    rng = np.random.default_rng(0)
    pts, labels = rng.normal(size=(60, 2)), np.repeat([3, 7, 9], 20)
    images = [np.full((8, 8), i, np.uint8) for i in range(60)]
    ax = viz.embedding_figure(pts, labels, images, n_thumbnails=7).axes[0]
    colours = ax.collections[0].get_facecolors()
    for c in (3, 7, 9):  # one colour per class, different between classes
        assert len(np.unique(colours[labels == c], axis=0)) == 1
    assert len(np.unique(colours, axis=0)) == 3
    boxes = [a for a in ax.artists if isinstance(a, AnnotationBbox)]
    assert len(boxes) == 7
    for box in boxes:  # each thumbnail is the image of the point it sits on
        i = int(np.flatnonzero((pts == box.xy).all(1))[0])
        np.testing.assert_allclose(box.offsetbox.get_data(), images[i] / 255.0)


def test_retrieval_grid_frames_match_brute_force_neighbours():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 6)
    x = np.eye(8)[labels] + rng.normal(size=(30, 8)) * 0.6
    emb = torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)
    images = [np.full((4, 4), i, np.uint8) for i in range(30)]
    queries, k = [0, 7, 13, 29], 4
    fig = viz.retrieval_grid(emb, torch.as_tensor(labels), images, queries=queries, k=k)
    axes = np.array(fig.axes)
    axes = axes.reshape(len(queries), k + 1)
    s = (emb @ emb.T).numpy()
    np.fill_diagonal(s, -np.inf)
    for row, q in enumerate(queries):
        top = np.argsort(-s[q], kind="stable")[:k]
        np.testing.assert_allclose(axes[row, 0].images[0].get_array(), images[q] / 255.0)
        for col, j in enumerate(top, start=1):
            ax = axes[row, col]
            np.testing.assert_allclose(ax.images[0].get_array(), images[j] / 255.0)
            colour = ax.spines["top"].get_edgecolor()
            want = viz.POS_COLOR if labels[j] == labels[q] else viz.NEG_COLOR
            assert np.allclose(colour, to_rgba(want))


def test_as_image_array_scales_pil_and_tensors():
    from PIL import Image

    img = Image.fromarray(np.array([[0, 255], [51, 102]], np.uint8))
    np.testing.assert_allclose(viz.as_image_array(img), [[0, 1], [0.2, 0.4]])
    t = torch.tensor([[[-2.0, 2.0]], [[0.0, 0.0]], [[1.0, -1.0]]])  # (3, 1, 2) normalised
    a = viz.as_image_array(t)
    assert a.shape == (1, 2, 3) and a.min() == 0 and a.max() == 1


# ------------------------------------------------------------------ data, models, batches (digits)
def test_class_counts_and_sample_grid_on_digits():
    splits = {s: datasets.build("digits", None, s) for s in ("train", "test")}
    counts = viz.class_counts(splits)
    for _, row in counts.iterrows():
        bc = np.bincount(splits[row["split"]].labels)
        got = (row["images"], row["classes"], row["min/class"], row["max/class"])
        assert got == (bc.sum(), 5, bc.min(), bc.max())
    fig = viz.sample_grid(splits, per_class=3, max_classes=2)
    axes = np.array(fig.axes).reshape(4, 3)
    assert [ax.get_ylabel().split("\n")[0] for ax in axes[:, 0]] == [
        "train",
        "train",
        "test",
        "test",
    ]
    first_test = splits["test"][int(np.flatnonzero(splits["test"].labels == 0)[0])][0]
    np.testing.assert_allclose(axes[2, 0].images[0].get_array(), np.asarray(first_test) / 255.0)
    assert "digits" in set(viz.dataset_overview()["name"])


def _small_cfg():
    return load_config("digits", ["model.embedding_dim=16", "model.convnet.width=16"])


def test_load_model_from_checkpoint_and_untrained_twin(tmp_path):
    cfg = _small_cfg()
    recipe.seed_everything(cfg.seed)
    start = recipe.build_model(cfg)  # what engine.train starts from
    trained = recipe.build_model(cfg)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    save_checkpoint(
        {"model": trained.state_dict(), "config": to_dict(cfg)}, tmp_path / "checkpoint.pt"
    )
    x = torch.randn(3, 1, 8, 8)
    loaded, loaded_cfg = load_model(tmp_path)  # a run folder
    assert loaded_cfg.model.embedding_dim == 16
    torch.testing.assert_close(loaded(x), trained.eval()(x))
    fresh, _ = load_model(cfg=loaded_cfg)
    torch.testing.assert_close(fresh(x), start.eval()(x))


def test_batch_similarity_is_a_pk_batch_of_the_model():
    cfg = _small_cfg()
    model, _ = load_model(cfg=cfg)
    sim, labels = explore.batch_similarity(model, cfg, n_classes=8, per_class=3, seed=1)
    assert sim.shape == (15, 15)  # digits' train split has only 5 classes
    assert labels.tolist() == sorted(labels.tolist())
    assert torch.bincount(labels).tolist() == [3] * 5
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(15), atol=1e-5, rtol=0)


def test_split_embeddings_subset_keeps_images_and_labels_aligned():
    cfg = _small_cfg()
    model, _ = load_model(cfg=cfg)
    emb, labels, images = explore.split_embeddings(model, cfg, max_items=40, seed=3)
    assert emb.shape == (40, 16) and len(labels) == len(images) == 40
    test = datasets.build("digits", None, "test")
    assert labels.tolist() == [int(test.labels[i]) for i in images.indices]
    np.testing.assert_array_equal(np.asarray(images[5]), np.asarray(test[images.indices[5]][0]))


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
