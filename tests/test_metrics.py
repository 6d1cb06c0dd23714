"""msl_kit.metrics against a brute-force numpy reference, faiss IndexFlatIP and PML's
AccuracyCalculator.

Most data here are small integers: every inner product is then exact in float32 whatever the
summation order, so equal scores are really equal and the tie rule (lower gallery index
first) can be checked exactly, and any block size must give bit-identical results.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msl_kit import metrics
from msl_kit.metrics import knn, nmi, recall_at_k, retrieval_metrics


def integer_data(seed: int, n: int, dim: int = 4, n_dupes: int = 0, n_classes: int = 5):
    """Small-integer vectors (many exact ties) with some exact duplicates, and labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    if n_dupes:
        x[rng.choice(n, n_dupes, replace=False)] = x[rng.choice(n, n_dupes)]
    return x, rng.integers(0, n_classes, n)


def unit_data(seed: int, n: int, dim: int = 16, n_classes: int = 20):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), rng.integers(0, n_classes, n)


def brute_knn(x, k, gallery=None, exclude_self=None):
    """Full score matrix in float64 and a stable sort: the reference ranking."""
    g = x if gallery is None else gallery
    exclude_self = gallery is None if exclude_self is None else exclude_self
    sims = x.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        n = min(len(x), len(g))
        sims[np.arange(n), np.arange(n)] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def brute_metrics(x, labels, ks, gallery=None, gallery_labels=None):
    """Recall@K, MAP@R and R-precision by a loop over queries, as Musgrave et al. define them."""
    symmetric = gallery is None
    g, gl = (x, labels) if symmetric else (gallery, gallery_labels)
    found = {k: [] for k in ks}
    aps, rps = [], []
    for i in range(len(x)):
        scores = g.astype(np.float64) @ x[i].astype(np.float64)
        candidates = np.arange(len(g))
        if symmetric:
            candidates = candidates[candidates != i]
        ranked = candidates[np.argsort(-scores[candidates], kind="stable")]
        hits = gl[ranked] == labels[i]
        for k in ks:
            found[k].append(hits[:k].any())
        r = int(hits.sum())
        if r == 0:
            continue
        precision = [hits[: j + 1].mean() for j in range(r)]
        aps.append(sum(p for p, h in zip(precision, hits[:r]) if h) / r)
        rps.append(hits[:r].mean())
    out = {f"recall@{k}": float(np.mean(v)) for k, v in found.items()}
    out["map@r"] = float(np.mean(aps)) if aps else math.nan
    out["r_precision"] = float(np.mean(rps)) if rps else math.nan
    return out


# --- kNN: exact ranking, ties, blocking ------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_size", [1, 3, 7, 16, 64, None])
def test_knn_matches_brute_force_with_ties(seed, block_size):
    x, _ = integer_data(seed, 41, n_dupes=10)
    sims, idx = knn(x, 9, block_size=block_size)
    ref_sims, ref_idx = brute_knn(x, 9)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(sims.numpy(), ref_sims.astype(np.float32))


@pytest.mark.parametrize("n,block_size", [(700, 256), (701, 256), (333, 100)])
def test_knn_large_tiles_use_the_threshold_path(n, block_size):
    # tiles wide enough for the column-group threshold; 701 leaves odd-sized tiles
    x, _ = integer_data(n, n, dim=6, n_dupes=50)
    for k in (1, 5, 40):
        _, idx = knn(x, k, block_size=block_size)
        np.testing.assert_array_equal(idx.numpy(), brute_knn(x, k)[1])


@pytest.mark.parametrize("block_size", [2, 4, 10, 64, None])
def test_knn_query_gallery_form(block_size):
    x, _ = integer_data(5, 70, n_dupes=8)
    query, gallery = x[:23], x[23:]
    _, idx = knn(query, 6, gallery, block_size=block_size)
    np.testing.assert_array_equal(idx.numpy(), brute_knn(query, 6, gallery)[1])
    # exclude_self with a gallery drops gallery item i for query i only
    _, idx = knn(x[:30], 6, x, exclude_self=True, block_size=block_size)
    np.testing.assert_array_equal(idx.numpy(), brute_knn(x[:30], 6, x, exclude_self=True)[1])
    # and query = gallery without exclusion ranks the query itself (score ties aside)
    _, idx = knn(x, 6, exclude_self=False, block_size=block_size)
    np.testing.assert_array_equal(idx.numpy(), brute_knn(x, 6, exclude_self=False)[1])


@pytest.mark.parametrize("block_size", [1, 2, 5, 8, None])
def test_ties_go_to_the_lower_gallery_index(block_size):
    x = np.ones((20, 3), np.float32)  # every score ties
    _, idx = knn(x, 19, block_size=block_size)
    expected = np.array([[j for j in range(20) if j != i] for i in range(20)])
    np.testing.assert_array_equal(idx.numpy(), expected)
    # duplicates of the query stay (the query is excluded by index, not by value)
    base = np.eye(4, dtype=np.float32)
    x = base[[0, 1, 0, 2, 0, 3, 0]]
    _, idx = knn(x, 3, block_size=block_size)
    assert idx[0].tolist() == [2, 4, 6] and idx[6].tolist() == [0, 2, 4]
    assert idx[2].tolist() == [0, 4, 6]


def test_signed_zero_scores_tie():
    # +0.0 and -0.0 are equal scores: the lower index must come first
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-0.0, -1.0], [0.0, 0.5]], np.float32)
    sims, idx = knn(x[:1], 3, x[1:])
    assert idx[0].tolist() == [0, 1, 2] and sims[0].tolist() == [0.0, 0.0, 0.0]


def test_self_excluded_even_when_scores_overflow():
    # 1e20 * 1e20 overflows float32: every score is +-inf, the query's own included
    x = np.array([[1e20], [-1e20], [-1e20], [1e20]], np.float32)
    sims, idx = knn(x, 3)
    assert idx[0].tolist() == [3, 1, 2] and idx[1].tolist() == [2, 0, 3]
    assert sims[0].tolist() == [math.inf, -math.inf, -math.inf]


def test_results_identical_for_all_block_sizes():
    x, _ = integer_data(11, 97, dim=8, n_dupes=20)
    ref = knn(x, 12, block_size=97)
    for block_size in (3, 5, 13, 32, 96, 1000):
        out = knn(x, 12, block_size=block_size)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), block_size


def test_tiles_stay_small_and_symmetry_halves_the_products(monkeypatch):
    calls = []
    real_mm = torch.mm

    def spy(a, b, **kwargs):
        calls.append((a.shape[0], b.shape[1]))
        return real_mm(a, b, **kwargs)

    monkeypatch.setattr(metrics.torch, "mm", spy)
    x, _ = unit_data(0, 1000)
    knn(x, 5, block_size=128)
    n_blocks = math.ceil(1000 / 128)
    assert len(calls) == n_blocks * (n_blocks + 1) // 2  # upper triangle only
    assert max(r * c for r, c in calls) <= 128 * 128  # never the N x N matrix
    calls.clear()
    knn(x[:300], 5, x, block_size=128)
    assert len(calls) == math.ceil(300 / 128) * n_blocks


def test_knn_matches_faiss_index_flat_ip():
    faiss = pytest.importorskip("faiss")
    x, _ = unit_data(3, 600, dim=32)
    index = faiss.IndexFlatIP(32)
    index.add(x)
    for query, k, drop_self in ((x, 10, True), (x[:100], 25, False)):
        ref_sims, ref_idx = index.search(query, k + 1 + drop_self)  # one more: is k-th tied?
        if drop_self:  # faiss has no self exclusion: every unit vector finds itself first
            assert (ref_idx[:, 0] == np.arange(len(x))).all()
            ref_sims, ref_idx = ref_sims[:, 1:], ref_idx[:, 1:]
            sims, idx = knn(x, k, block_size=128)
        else:
            sims, idx = knn(query, k, x, block_size=128)
        np.testing.assert_allclose(sims.numpy(), ref_sims[:, :k], atol=1e-5)
        # orders agree except where two scores tie within float rounding
        apart = np.diff(ref_sims, axis=1) < -1e-5
        clear = np.concatenate([np.ones_like(apart[:, :1]), apart[:, :-1]], 1) & apart
        assert clear.mean() > 0.99
        assert (idx.numpy() == ref_idx[:, :k])[clear].all()


def test_input_types_numpy_torch_half():
    x, _ = integer_data(4, 40)
    ref = knn(x, 5)
    for variant in (
        torch.from_numpy(x),
        x.astype(np.float16),
        torch.from_numpy(x).bfloat16(),
        x.astype(np.float64),
        np.asfortranarray(x),
        torch.from_numpy(x).T.contiguous().T,
    ):
        sims, idx = knn(variant, 5)
        assert sims.dtype == torch.float32 and idx.dtype == torch.int64
        assert torch.equal(idx, ref[1]) and torch.equal(sims, ref[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_knn_on_cuda_matches_cpu():
    x, _ = integer_data(6, 3000, dim=16, n_dupes=100)
    ref = knn(x, 20, block_size=512)
    for dtype in (torch.float32, torch.float16):
        sims, idx = knn(torch.from_numpy(x).cuda().to(dtype), 20, block_size=512)
        assert idx.is_cuda and torch.equal(idx.cpu(), ref[1]) and torch.equal(sims.cpu(), ref[0])


# --- Recall@K, MAP@R, R-precision -----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_metrics_match_brute_force(seed):
    x, labels = integer_data(seed, 80, n_dupes=15, n_classes=6)
    labels[:3] = [100, 101, 102]  # three classes of one: R = 0 for those queries
    ks = (1, 2, 4, 8, 16)
    ref = brute_metrics(x, labels, ks)
    for block_size in (3, 32, None):
        out = retrieval_metrics(x, labels, ks, block_size=block_size)
        assert out == pytest.approx(ref, abs=1e-12)
        assert recall_at_k(x, labels, ks, block_size=block_size) == pytest.approx(
            {k: ref[f"recall@{k}"] for k in ks}, abs=1e-12
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_query_gallery_form_match_brute_force(seed):
    x, labels = integer_data(seed, 90, n_dupes=10, n_classes=8)
    query, gallery = x[:30], x[30:]
    q_labels, g_labels = labels[:30].copy(), labels[30:]
    q_labels[0] = 99  # absent from the gallery: a miss in recall, left out of MAP@R
    ks = (1, 5, 10)
    ref = brute_metrics(query, q_labels, ks, gallery, g_labels)
    out = retrieval_metrics(
        query, q_labels, ks, gallery=gallery, gallery_labels=g_labels, block_size=7
    )
    assert out == pytest.approx(ref, abs=1e-12)
    assert (
        recall_at_k(query, q_labels, ks, gallery=gallery, gallery_labels=g_labels)[1]
        == ref["recall@1"]
    )


def test_metrics_match_pml_accuracy_calculator():
    faiss = pytest.importorskip("faiss")
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.utils.inference import FaissKNN

    # PML differs in two ways: it drops queries whose class has no other member from every
    # metric (we count them as recall misses), and it finds "self" by searching k + 1 and
    # removing the query's index (the same as ours up to the order of tied scores).
    # Continuous data (no ties) and classes of at least 2 make the definitions coincide.
    calc = pml.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP),
    )
    for seed in (0, 1, 2):
        x, labels = unit_data(seed, 400, dim=8, n_classes=25)
        ours = retrieval_metrics(x, labels, (1,), block_size=64)
        theirs = calc.get_accuracy(x, labels)
        assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-9)
        assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-9)
        assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-9)
        # In-Shop style: separate query and gallery sets, nothing excluded
        ours = retrieval_metrics(
            x[:150], labels[:150], (1,), gallery=x[150:], gallery_labels=labels[150:]
        )
        theirs = calc.get_accuracy(
            x[:150], labels[:150], x[150:], labels[150:], ref_includes_query=False
        )
        lone = ~np.isin(labels[:150], labels[150:])
        assert ours["recall@1"] == pytest.approx(
            theirs["precision_at_1"] * (1 - lone.mean()), abs=1e-9
        )
        assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-9)
        assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-9)


def test_metrics_invariant_to_permuting_the_data():
    x, labels = unit_data(7, 300, n_classes=15)
    perm = np.random.default_rng(0).permutation(300)
    ks = (1, 2, 4, 8)
    a = retrieval_metrics(x, labels, ks, block_size=64)
    b = retrieval_metrics(x[perm], labels[perm], ks, block_size=50)
    assert a == pytest.approx(b, abs=1e-12)
    # the neighbours themselves map through the permutation
    idx = knn(x, 5)[1].numpy()
    idx_perm = knn(x[perm], 5)[1].numpy()
    np.testing.assert_array_equal(perm[idx_perm], idx[perm])


def test_recall_monotone_and_metrics_in_unit_interval():
    x, labels = unit_data(8, 250, n_classes=30)
    ks = (1, 2, 3, 4, 8, 16, 32, 64)
    out = retrieval_metrics(x, labels, ks)
    recalls = [out[f"recall@{k}"] for k in ks]
    assert recalls == sorted(recalls) and recalls[0] < recalls[-1]
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert out["r_precision"] <= out["recall@64"]


def test_perfect_embeddings_score_one():
    labels = np.repeat(np.arange(5), 4)
    x = np.eye(5, dtype=np.float32)[labels]
    out = retrieval_metrics(x, labels, (1, 3))
    assert out == {"recall@1": 1.0, "recall@3": 1.0, "map@r": 1.0, "r_precision": 1.0}


def test_large_class_clips_r_with_a_warning():
    x, labels = integer_data(9, 60, n_classes=2)  # classes of about 30
    with pytest.warns(UserWarning, match="max_r"):
        clipped = retrieval_metrics(x, labels, (1,), max_r=5)
    exact = retrieval_metrics(x, labels, (1,), max_r=None)
    assert exact == pytest.approx(brute_metrics(x, labels, (1,)), abs=1e-12)
    # the ranking stops at 5 for every query (all have R > 5 here): R-precision is precision@5;
    # MAP@R counts ranks past 5 as misses, still divided by the true R (PML's definition)
    _, idx = brute_knn(x, 5)
    hits = labels[idx] == labels[:, None]
    precision = np.cumsum(hits, 1) / np.arange(1, 6)
    true_r = np.bincount(labels)[labels] - 1
    assert clipped["r_precision"] == pytest.approx(hits.mean(), abs=1e-12)
    want = ((precision * hits).sum(1) / true_r).mean()
    assert clipped["map@r"] == pytest.approx(want, abs=1e-12)
    assert clipped["map@r"] <= exact["map@r"]  # a lower bound of the exact value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retrieval_metrics(x, labels, (1,), max_r=100)


def test_map_at_r_past_max_r_is_pmls_accuracy_calculator():
    """Issue 24.24: where the ranking stops before R (max_r < R), MAP@R divided by min(R, max_r)
    (MAP@max_r, up to 3x higher) while PML's AccuracyCalculator(k=max_r) divides by R."""
    faiss = pytest.importorskip("faiss")
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.utils.inference import FaissKNN

    calc = pml.AccuracyCalculator(
        include=("mean_average_precision_at_r", "r_precision"),
        k=5,
        device=torch.device("cpu"),
        knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP),
    )
    x, labels = unit_data(3, 90, dim=8, n_classes=3)  # classes of ~30, ranking cut at 5
    with pytest.warns(UserWarning, match="max_r=5"):
        ours = retrieval_metrics(x, labels, (1,), max_r=5)
    theirs = calc.get_accuracy(x, labels)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-9)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-9)


@pytest.mark.parametrize(
    "max_r, error", [(-1, ValueError), (0, ValueError), (1.5, TypeError), (True, TypeError),
                     ("max", TypeError)]
)  # fmt: skip
def test_max_r_is_checked_as_ks_is(max_r, error):
    """Issue 24.24: -1 and 0 gave NaN MAP@R, 1.5 and True silently meant 1, "max" was a bare
    TypeError."""
    x, labels = unit_data(0, 20, n_classes=4)
    with pytest.raises(error, match="max_r must be a positive int"):
        retrieval_metrics(x, labels, (1,), max_r=max_r)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 40),
    dim=st.integers(1, 5),
    n_classes=st.integers(1, 6),
    block_size=st.integers(1, 45),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property_matches_brute_force(n, dim, n_classes, block_size, seed, data):
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(n, dim)).astype(np.float32)  # ties everywhere
    labels = rng.integers(0, n_classes, n)
    k = data.draw(st.integers(1, n - 1))
    _, idx = knn(x, k, block_size=block_size)
    np.testing.assert_array_equal(idx.numpy(), brute_knn(x, k)[1])
    ks = tuple(sorted(set(data.draw(st.lists(st.integers(1, n - 1), min_size=1, max_size=3)))))
    out = retrieval_metrics(x, labels, ks, block_size=block_size, max_r=None)
    ref = brute_metrics(x, labels, ks)
    for key, value in ref.items():
        assert (math.isnan(value) and math.isnan(out[key])) or out[key] == pytest.approx(
            value, abs=1e-12
        )


# --- NMI --------------------------------------------------------------------------------------


def test_nmi_separated_clusters_and_sklearn_reference():
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    labels = np.repeat(np.arange(4), 25)
    centres = np.eye(4, 8, dtype=np.float32) * 10
    x = centres[labels] + np.random.default_rng(0).normal(0, 0.1, (100, 8)).astype(np.float32)
    assert nmi(x, labels) == pytest.approx(1.0)
    noisy = np.random.default_rng(1).standard_normal((100, 8)).astype(np.float32)
    expected = normalized_mutual_info_score(
        labels, KMeans(n_clusters=4, n_init=10, random_state=3).fit_predict(noisy)
    )
    assert nmi(noisy, labels, seed=3) == pytest.approx(expected)
    assert nmi(noisy, labels, seed=3) < 0.5


# --- input validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, y: recall_at_k(x, y[:-1]), "has 9 entries but there are 10"),
        (lambda x, y: recall_at_k(x, y[:, None]), "1-D"),
        (lambda x, y: recall_at_k(x, y.astype(float)), "integers"),
        (lambda x, y: recall_at_k(x, y, (1, 10)), "exceeds the 9 gallery items"),
        (lambda x, y: recall_at_k(x, y, ()), "ks must be positive"),
        (lambda x, y: recall_at_k(x, y, (0, 1)), "ks must be positive"),
        (lambda x, y: recall_at_k(x, y, gallery=x), "gallery_labels"),
        (lambda x, y: recall_at_k(x, y, (1, 11), gallery=x, gallery_labels=y), "exceeds the 10"),
        (lambda x, y: retrieval_metrics(x, y, gallery=x[:, :2], gallery_labels=y), "dimension"),
        (lambda x, y: recall_at_k(x[0], y), "2-D"),
        (lambda x, y: recall_at_k(np.where(np.eye(10, 4) > 0, np.nan, x), y), "NaN"),
        (lambda x, y: knn(x, 3, np.full((5, 4), np.inf)), "inf"),
        (lambda x, y: knn(x, 0), r"k must be an int in \[1, 9\]"),
        (lambda x, y: knn(x, 10), r"k must be an int in \[1, 9\]"),
        (lambda x, y: knn(x, 10, x), None),  # allowed: no exclusion with a gallery
        (lambda x, y: knn(x, 3, block_size=0), "block_size"),
        (lambda x, y: nmi(x, y[:-1]), "has 9 entries"),
    ],
)
def test_input_validation(call, match):
    x, y = integer_data(0, 10)
    if match is None:
        call(x, y)
        return
    with pytest.raises(ValueError, match=match):
        call(x, y)


# --- overflow and queries without a relevant item (issue 12) ----------------------------------


def test_norms_that_overflow_float32_inner_products_are_rejected():
    labels = np.repeat(np.arange(3), 4)
    x = np.eye(3, 8, dtype=np.float32)[labels] + 0.01 * np.random.default_rng(0).standard_normal(
        (12, 8)
    ).astype(np.float32)
    assert recall_at_k(x, labels, (1,)) == {1: 1.0}
    for scale in (1e20, 3e19):  # finite inputs whose products overflow float32
        with pytest.raises(ValueError, match="norm up to .*overflow.*L2-normalise"):
            recall_at_k(x * scale, labels, (1,))
        with pytest.raises(ValueError, match="gallery has rows of norm"):
            recall_at_k(x, labels, (1,), gallery=x * scale, gallery_labels=labels)
    assert recall_at_k(x * 1e18, labels, (1,)) == {1: 1.0}  # large but safe: still exact


def test_queries_without_relevant_items_are_reported():
    x = np.eye(6, dtype=np.float32)
    with pytest.warns(UserWarning, match="6 of 6 queries have no relevant item"):
        out = retrieval_metrics(x, np.arange(6), (1,))
    assert out["recall@1"] == 0.0 and math.isnan(out["map@r"])
    labels = np.array([0, 0, 0, 1, 1, 2])  # one single-image class
    with pytest.warns(UserWarning, match="1 of 6 queries"):
        assert recall_at_k(np.eye(3, dtype=np.float32)[labels], labels, (1,))[1] == 5 / 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recall_at_k(np.eye(3, dtype=np.float32)[labels[:5]], labels[:5], (1,))
