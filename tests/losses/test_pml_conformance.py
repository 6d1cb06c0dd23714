"""pytorch-metric-learning's own tests for the MS loss, the MS miner and AccuracyCalculator,
ported to call msl_kit with the matching options (issue 21).

The inputs and the expected numbers are PML's (tests/losses/test_multi_similarity_loss.py,
tests/miners/test_multi_similarity_miner.py, tests/utils/test_calculate_accuracies.py at
KevinMusgrave/pytorch-metric-learning 216a792); the test code is ours. PML's loss and miner
normalise the embeddings (cosine similarity); msl_kit takes unit vectors, so the ports
normalise first. PML's AccuracyCalculator ranks by Euclidean distance (faiss) and leaves
queries without a relevant item out: `metric="euclidean"`, `lone_queries="skip"` here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msl_kit.losses import MultiSimilarityLoss, mined_pairs
from msl_kit.metrics import retrieval_metrics

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")


def angle_to_coord(angle: float) -> tuple[float, float]:
    """PML's test embeddings: a point on an ellipse (x * 2, y * 0.5), unnormalised."""
    return 2 * math.cos(math.radians(angle)), 0.5 * math.sin(math.radians(angle))


def loop_ms_every_pair(x, labels, alpha, beta, base, ref=None, ref_labels=None):
    """The MS loss over every pair, each term on its own (PML's reference loop): an anchor
    without a positive keeps its negative term."""
    ref, ref_labels = (x, labels) if ref is None else (ref, ref_labels)
    total = x.new_zeros(())
    for i in range(len(x)):
        others = [j for j in range(len(ref)) if ref is not x or j != i]
        sims = [(x[i] @ ref[j], bool(ref_labels[j] == labels[i])) for j in others]
        pos = [torch.exp(-alpha * (s - base)) for s, same in sims if same]
        neg = [torch.exp(beta * (s - base)) for s, same in sims if not same]
        if pos:
            total = total + torch.log1p(sum(pos)) / alpha
        if neg:
            total = total + torch.log1p(sum(neg)) / beta
    return total / len(x)


# ----------------------------------------------------------------------------- MS loss
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_ms_loss_without_mining_matches_pml_test(dtype):
    """PML test_multi_similarity_loss: 5 points, labels [0, 0, 1, 1, 2] (the last one has no
    positive), alpha 0.1, beta 40 (10 for float16), base 0.5."""
    alpha, beta, base = (0.1, 10.0, 0.5) if dtype == torch.float16 else (0.1, 40.0, 0.5)
    raw = torch.tensor([angle_to_coord(a) for a in [0, 20, 40, 60, 80]], dtype=dtype)
    labels = torch.tensor([0, 0, 1, 1, 2])
    x = F.normalize(raw.double(), dim=1).to(dtype).requires_grad_(True)
    loss = MultiSimilarityLoss(alpha, beta, base, margin=0.1, mining="none")(x, labels)
    loss.backward()
    expected = loop_ms_every_pair(x.detach().double(), labels, alpha, beta, base)
    rtol = 1e-2 if dtype == torch.float16 else 1e-5
    assert torch.isclose(loss.double(), expected, rtol=rtol)
    ref = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)(raw.double(), labels)
    assert torch.isclose(loss.double(), ref, rtol=rtol)
    if dtype == torch.float64:  # the number issue 21 quotes: 5.8110 (anchor 4 dropped: 5.7402)
        assert round(loss.item(), 4) == 5.8110
        dropped = MultiSimilarityLoss(alpha, beta, base, margin=2.0)(x.detach(), labels)
        assert round(dropped.item(), 4) == 5.7402  # the validity rule of MS mining


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ms_loss_with_references_matches_pml_test(dtype):
    """PML test_multi_similarity_loss_with_ref: 4 anchors against 3 references."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(4, 32, generator=g, dtype=dtype), dim=1).requires_grad_(True)
    ref = F.normalize(torch.randn(3, 32, generator=g, dtype=dtype), dim=1)
    labels, ref_labels = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2])
    loss = MultiSimilarityLoss(0.1, 40.0, 0.5, mining="none")(x, labels, ref, ref_labels)
    loss.backward()
    expected = loop_ms_every_pair(x.detach(), labels, 0.1, 40.0, 0.5, ref, ref_labels)
    assert torch.isclose(loss, expected, rtol=1e-5)
    pml = pml_losses.MultiSimilarityLoss(alpha=0.1, beta=40, base=0.5)
    assert torch.isclose(loss, pml(x.detach(), labels, ref_emb=ref, ref_labels=ref_labels))


def test_ms_loss_with_no_valid_pairs_is_zero_and_backpropagates():
    """PML test_with_no_valid_pairs: one embedding."""
    x = F.normalize(torch.tensor([angle_to_coord(0)]), dim=1).requires_grad_(True)
    for mining in ("none", "ms"):
        loss = MultiSimilarityLoss(0.1, 40.0, 0.5, mining=mining)(x, torch.tensor([0]))
        loss.backward()
        assert loss.item() == 0


# ----------------------------------------------------------------------------- MS miner
def loop_ms_miner(sim, labels, epsilon):
    """PML's reference loop: keep positive (a, p) if S_ap < max negative S_an + eps; keep
    negative (a, n) if S_an > min positive S_ap - eps (hardest pairs of the un-mined sets)."""
    n = len(labels)
    pos = {(i, j) for i in range(n) for j in range(n) if j != i and labels[i] == labels[j]}
    neg = {(i, j) for i in range(n) for j in range(n) if labels[i] != labels[j]}
    max_neg = {i: max((sim[a][b] for a, b in neg if a == i), default=-math.inf) for i in range(n)}
    min_pos = {i: min((sim[a][b] for a, b in pos if a == i), default=math.inf) for i in range(n)}
    kept_pos = {(a, p) for a, p in pos if sim[a][p] < max_neg[a] + epsilon}
    kept_neg = {(a, k) for a, k in neg if sim[a][k] > min_pos[a] - epsilon}
    return kept_pos, kept_neg


def _pairs(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in mask.nonzero().tolist()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ms_miner_matches_pml_test(dtype):
    """PML test_multi_similarity_miner (cosine): 64 angles, 10 random labels, epsilon 0.1."""
    torch.manual_seed(9599)
    raw = torch.tensor([angle_to_coord(a) for a in range(64)], dtype=dtype)
    labels = torch.randint(low=0, high=10, size=(64,))
    x = F.normalize(raw, dim=1)
    sim = x @ x.T
    kept_pos, kept_neg = mined_pairs(sim, labels, margin=0.1)
    expected_pos, expected_neg = loop_ms_miner(sim.tolist(), labels.tolist(), 0.1)
    assert _pairs(kept_pos) == expected_pos and _pairs(kept_neg) == expected_neg
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(0.1)(raw, labels)
    assert _pairs(kept_pos) == set(zip(a1.tolist(), p.tolist()))
    assert _pairs(kept_neg) == set(zip(a2.tolist(), n.tolist()))


def test_ms_miner_empty_output_matches_pml_test():
    """PML test_empty_output: 32 distinct labels, so no positive pair is mined."""
    x = F.normalize(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), dim=1)
    kept_pos, kept_neg = mined_pairs(x @ x.T, torch.arange(32), margin=0.1)
    assert not kept_pos.any() and not kept_neg.any()


# ----------------------------------------------------------------------------- accuracy
# PML test_accuracy_calculator: each query's top-5 labels and the gallery's label counts.
QUERY_LABELS = [1, 1, 2, 3, 4, 0]
KNN_LABELS = [
    [0, 1, 1, 2, 2],
    [1, 0, 1, 1, 3],
    [4, 4, 4, 4, 2],
    [3, 1, 3, 1, 3],
    [0, 0, 4, 2, 2],
    [1, 2, 3, 4, 5],
]
LABEL_COUNTS = {0: 2, 1: 3, 2: 5, 3: 4, 4: 5, 5: 1}  # PML's counts, plus the one item "5"


def _ranked_gallery(top: list[int], gallery_labels: list[int]) -> torch.Tensor:
    """A query vector whose inner products rank gallery items of the labels `top` first, in
    that order (one one-hot axis per gallery item, weights 5, 4, ...; the rest score 0)."""
    used, q = set(), torch.zeros(len(gallery_labels), dtype=torch.float64)
    for rank, label in enumerate(top):
        item = next(i for i, y in enumerate(gallery_labels) if y == label and i not in used)
        used.add(item)
        q[item] = len(top) - rank
    return q


def _synthetic_accuracy(shift: int, ref_includes_query: bool, lone: str) -> dict:
    """msl_kit's metrics on embeddings whose kNN lists are PML's (gallery labels + `shift`),
    averaged over the queries; with `ref_includes_query` each query's own gallery item is left
    out (PML drops the first neighbour, the query itself)."""
    per_query = []
    for q_label, row in zip(QUERY_LABELS, KNN_LABELS):
        counts = dict(LABEL_COUNTS)
        top = row
        if ref_includes_query:  # the query is one of its class's items: R = count - 1
            counts[q_label] -= 1
            top = row[1:]
        g_labels = [y for y, c in counts.items() for _ in range(c)]
        q = _ranked_gallery(top, g_labels)
        per_query.append(
            retrieval_metrics(
                q[None],
                [q_label],
                ks=(1,),
                gallery=torch.eye(len(g_labels), dtype=torch.float64),
                gallery_labels=[y + shift for y in g_labels],
                lone_queries=lone,
            )
        )
    return {k: np.nanmean([m[k] for m in per_query]) for k in per_query[0]}


@pytest.mark.filterwarnings("ignore:.*no relevant item")
@pytest.mark.filterwarnings("ignore:Mean of empty slice")
@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_precision_at_1_r_precision_map_at_r_match_pml_test(ref_includes_query):
    """PML's expected values (global average): precision_at_1 = msl_kit's recall@1."""
    if not ref_includes_query:
        p1 = 2.0 / 6
        rp = [2 / 3, 2 / 3, 1 / 5, 2 / 4, 1 / 5, 0]
        mapr = [(1 / 2 + 2 / 3) / 3, (1 + 2 / 3) / 3, (1 / 5) / 5, (1 + 2 / 3) / 4, (1 / 3) / 5, 0]
    else:
        p1 = 1.0 / 6
        rp = [1, 1 / 2, 1 / 4, 1 / 3, 1 / 4, 0]
        mapr = [1, (1 / 2) / 2, (1 / 4) / 4, (1 / 2) / 3, (1 / 2) / 4, 0]
    for lone in ("miss", "skip"):  # every query has a relevant item: both conventions agree
        got = _synthetic_accuracy(0, ref_includes_query, lone)
        assert got["recall@1"] == pytest.approx(p1, rel=1e-6)
        assert got["r_precision"] == pytest.approx(np.mean(rp), rel=1e-6)
        assert got["map@r"] == pytest.approx(np.mean(mapr), rel=1e-6)
    # PML's second case: gallery labels shifted by 5, so no query has a relevant item: all nan
    got = _synthetic_accuracy(5, ref_includes_query, "skip")
    assert all(math.isnan(got[k]) for k in ("recall@1", "r_precision", "map@r"))
    assert _synthetic_accuracy(5, ref_includes_query, "miss")["recall@1"] == 0.0


def _per_query_ref_includes_query(query, q_labels, ref, ref_labels, lone: str) -> dict:
    """PML's ref_includes_query=True (the queries are ref[:len(query)]): each query against
    the reference without its own item."""
    runs = []
    for i in range(len(query)):
        keep = [j for j in range(len(ref)) if j != i]
        runs.append(
            retrieval_metrics(
                query[i : i + 1],
                q_labels[i : i + 1],
                ks=(1,),
                gallery=ref[keep],
                gallery_labels=ref_labels[keep],
                metric="euclidean",
                lone_queries=lone,
            )
        )
    return {k: np.nanmean([r[k] for r in runs]) for k in runs[0]}


@pytest.mark.filterwarnings("ignore:.*no relevant item")
@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_accuracy_calculator_and_faiss_euclidean_matches_pml_test():
    """PML _test_accuracy_calculator_and_faiss: points on a line, ranked by L2 distance."""
    query = torch.arange(10, dtype=torch.float64)[:, None]
    labels = torch.arange(10)
    got = retrieval_metrics(
        query, labels, ks=(1,), gallery=query, gallery_labels=labels, metric="euclidean"
    )
    assert got == {"recall@1": 1.0, "map@r": 1.0, "r_precision": 1.0}
    # 20 references: the queries 0..9 (labels 0..9), then 0.5 .. 9.5 (all label 1). Only the
    # query of label 1 has a relevant item besides itself; PML leaves the other nine out.
    ref = (torch.arange(20, dtype=torch.float64) / 2)[:, None]
    ref = torch.cat([ref[::2], ref[1::2]])
    ref_labels = torch.cat([labels, torch.ones(10, dtype=torch.long)])
    got = _per_query_ref_includes_query(query, labels, ref, ref_labels, "skip")
    assert got["recall@1"] == pytest.approx(1.0)
    assert got["r_precision"] == pytest.approx(0.5)
    assert got["map@r"] == pytest.approx((1 + 2 / 2 + 3 / 5 + 4 / 7 + 5 / 9) / 10, rel=1e-6)
    # msl_kit's default counts the nine lone queries as misses
    missed = _per_query_ref_includes_query(query, labels, ref, ref_labels, "miss")
    assert missed["recall@1"] == pytest.approx(0.1)


def test_global_average_with_far_points_matches_pml_test():
    """PML _test_accuracy_calculator_and_faiss_avg_of_avgs (global average)."""
    query = torch.arange(10, dtype=torch.float64)[:, None]
    ref = torch.arange(10, dtype=torch.float64)[:, None]
    query[-1], ref[0] = 100, -100
    q_labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    r_labels = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    got = retrieval_metrics(
        query, q_labels, ks=(1,), gallery=ref, gallery_labels=r_labels, metric="euclidean"
    )
    assert got == pytest.approx({"recall@1": 0.9, "r_precision": 0.9, "map@r": 0.9}, rel=1e-6)


def test_tied_distances_exclude_the_query_by_index_as_pml_test():
    """PML test_tied_distances: two colocated pairs of different labels; the query itself must
    be the item left out, so each query's nearest other item is a miss."""
    emb = torch.tensor([[10.0], [10.0], [20.0], [20.0]])
    got = retrieval_metrics(emb, torch.tensor([1, 0, 1, 0]), ks=(1,), metric="euclidean")
    assert got["recall@1"] == 0


@pytest.mark.filterwarnings("ignore:.*no relevant item")
def test_skip_equals_pml_accuracy_calculator_on_random_data():
    """Peer check beyond PML's fixtures: clustered points with singleton classes, msl_kit
    (euclidean, skip) against PML's AccuracyCalculator (faiss L2)."""
    ac_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    g = torch.Generator().manual_seed(3)
    labels = torch.cat([torch.randint(0, 12, (150,), generator=g), torch.arange(100, 110)])
    x = (torch.randn(16, 8, generator=g)[labels % 16] + torch.randn(160, 8, generator=g)).float()
    ours = retrieval_metrics(
        x, labels, ks=(1,), metric="euclidean", lone_queries="skip", max_r=None
    )
    calc = ac_mod.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count"
    )
    pml = calc.get_accuracy(x, labels, x, labels, True)
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
