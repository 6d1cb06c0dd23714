"""Tests for msl_kit.losses against naive per-anchor loops, autograd and PML."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msl_kit.losses import (
    LOSSES,
    PRESETS,
    BinomialDevianceLoss,
    ContrastiveLoss,
    LiftedStructureLoss,
    MSParams,
    MultiSimilarityLoss,
    PairWeights,
    TripletLoss,
    build_loss,
    gpw_pair_weights,
    mined_pairs,
    ms_per_anchor,
    multi_similarity_loss,
    pair_weights,
)

DEFAULTS = dict(alpha=2.0, beta=40.0, lam=0.5, margin=0.1)

# The losses of similarity pairs (Proxy-Anchor scores samples against proxies: its own tests)
PAIR_LOSSES = sorted(name for name, spec in LOSSES.items() if spec.pairs)


# ----------------------------------------------------------------------------- references
def loop_ms_rows(
    sim, labels, ref_labels=None, ignore=None, alpha=2.0, beta=40.0, lam=0.5, margin=0.1
):
    """Naive per-anchor MS losses, written straight from DESIGN.md; a list of 0-dim tensors."""
    rows = []
    self_ref = ref_labels is None
    ref_labels = labels if self_ref else ref_labels
    for i in range(sim.shape[0]):
        pos, neg = [], []
        for j in range(sim.shape[1]):
            if (self_ref and j == i) or (ignore is not None and ignore[i, j]):
                continue
            (pos if ref_labels[j] == labels[i] else neg).append(sim[i, j])
        if not pos or not neg:
            rows.append(sim.new_zeros(()))
            continue
        min_pos, max_neg = min(pos), max(neg)
        kept_neg = [s for s in neg if s + margin > min_pos]
        kept_pos = [s for s in pos if s - margin < max_neg]
        if not kept_neg or not kept_pos:
            rows.append(sim.new_zeros(()))
            continue
        # log(1 + sum e^z) written as a logsumexp with a zero so that large beta * S stays finite
        zero = sim.new_zeros(())
        pos_term = torch.logsumexp(torch.stack([zero] + [-alpha * (s - lam) for s in kept_pos]), 0)
        neg_term = torch.logsumexp(torch.stack([zero] + [beta * (s - lam) for s in kept_neg]), 0)
        rows.append(pos_term / alpha + neg_term / beta)
    return rows


def loop_ms(sim, labels, **kw):
    rows = loop_ms_rows(sim, labels, **kw)
    return torch.stack(rows).sum() / len(rows)


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def pk_labels(n, k):
    return torch.arange(n) // k


def batches():
    """(name, embeddings, labels) covering the edge cases the loss must get right."""
    out = []
    for seed in range(4):
        g = torch.Generator().manual_seed(100 + seed)
        out.append((f"random{seed}", unit(24, 6, seed), torch.randint(0, 5, (24,), generator=g)))
    out.append(("pk", unit(20, 8, 7), pk_labels(20, 4)))
    out.append(("one_class", unit(10, 4, 8), torch.zeros(10, dtype=torch.long)))
    out.append(("singletons", unit(10, 4, 9), torch.arange(10)))
    mixed = torch.cat([pk_labels(12, 3), torch.arange(100, 106)])  # some classes of one sample
    out.append(("mixed_singletons", unit(18, 5, 10), mixed))
    x = unit(12, 4, 11)
    dup = torch.cat([x, x[:6]])  # exact duplicates, ties in S
    out.append(("duplicates", dup, torch.cat([pk_labels(12, 3), pk_labels(6, 3)])))
    out.append(
        ("dup_cross_class", torch.cat([x, x]), torch.cat([pk_labels(12, 2), pk_labels(12, 3)]))
    )
    return out


PARAMS = [
    DEFAULTS,
    PRESETS["paper"],
    dict(alpha=0.1, beta=200.0, lam=0.5, margin=0.1),
    dict(alpha=50.0, beta=1.0, lam=0.0, margin=0.0),
    dict(alpha=2.0, beta=200.0, lam=1.0, margin=2.0),
    dict(alpha=10.0, beta=100.0, lam=-0.5, margin=0.0),
]


# ----------------------------------------------------------------------------- MS vs loop
def assert_matches_loop(ours_fn, ref_fn, x: torch.Tensor) -> torch.Tensor:
    """ours_fn(embeddings) against ref_fn(sim) in value and in the embeddings' gradient;
    where the loop has no graph (no valid anchor) our gradient must be exactly zero."""
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, ref = ours_fn(x_ours), ref_fn(x_ref @ x_ref.T)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ours.backward()
    if ref.requires_grad:
        ref.backward()
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-8, atol=1e-12)
    else:
        assert torch.count_nonzero(x_ours.grad) == 0
    return ours


@pytest.mark.parametrize(
    "params", PARAMS, ids=lambda p: "a{alpha}-b{beta}-l{lam}-m{margin}".format(**p)
)
@pytest.mark.parametrize("case", batches(), ids=lambda c: c[0])
def test_ms_loss_and_grad_match_loop(case, params):
    _, x, labels = case
    ours = assert_matches_loop(
        lambda e: MultiSimilarityLoss(**params)(e, labels),
        lambda s: loop_ms(s, labels, **params),
        x,
    )
    assert ours.dim() == 0 and torch.isfinite(ours)
    # the functional (autograd) path on a leaf similarity matrix agrees with the loop too
    sim_ours = (x @ x.T).requires_grad_(True)
    sim_ref = (x @ x.T).requires_grad_(True)
    functional = multi_similarity_loss(sim_ours, labels, **params)
    ref_sim = loop_ms(sim_ref, labels, **params)
    torch.testing.assert_close(functional, ref_sim.detach(), rtol=1e-10, atol=1e-12)
    functional.backward()
    expected = torch.autograd.grad(ref_sim, sim_ref)[0] if ref_sim.requires_grad else 0 * sim_ref
    torch.testing.assert_close(sim_ours.grad, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", batches(), ids=lambda c: c[0])
def test_pair_weights_equal_autograd_of_loop(case):
    _, x, labels = case
    sim = (x @ x.T).requires_grad_(True)
    rows = loop_ms_rows(sim, labels, **DEFAULTS)
    total = torch.stack(rows).sum()
    grad = torch.autograd.grad(total, sim)[0] if total.requires_grad else torch.zeros_like(sim)
    same = labels[:, None] == labels[None, :]
    pos_mask = same & ~torch.eye(len(labels), dtype=torch.bool)
    weights = pair_weights(sim.detach(), labels, **DEFAULTS)
    assert isinstance(weights, PairWeights)
    torch.testing.assert_close(
        weights.pos, torch.where(pos_mask, -grad, 0.0), rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(weights.neg, torch.where(~same, grad, 0.0), rtol=1e-9, atol=1e-12)
    assert (weights.pos >= 0).all() and (weights.neg >= 0).all()
    assert (weights.pos[~pos_mask] == 0).all() and (weights.neg[same] == 0).all()


def test_pair_weights_are_mined_and_analytic_not_uniform():
    x, labels = unit(20, 8, 3), pk_labels(20, 4)
    sim = x @ x.T
    weights = pair_weights(sim, labels)
    # a mined negative's weight grows with its similarity (the paper's w-)
    row = (weights.neg[0] > 0).nonzero().flatten()
    order = sim[0, row].argsort()
    assert (weights.neg[0, row[order]].diff() > 0).all()
    # at least one negative is dropped by mining on this batch
    assert ((labels[0] != labels) & (weights.neg[0] == 0)).any()


def test_functional_with_ref_labels_and_ignore_matches_loop():
    anchors, anchor_labels = unit(10, 6, 21), pk_labels(10, 2)
    bank, bank_labels = (
        unit(25, 6, 22),
        torch.randint(0, 6, (25,), generator=torch.Generator().manual_seed(1)),
    )
    refs = torch.cat([anchors, bank])  # each anchor also sits in the "bank"
    ref_labels = torch.cat([anchor_labels, bank_labels])
    ignore = torch.zeros(10, 35, dtype=torch.bool)
    ignore[torch.arange(10), torch.arange(10)] = True  # skip each anchor's own copy
    for params in (DEFAULTS, PARAMS[2], PARAMS[4]):
        sim_ours = (anchors @ refs.T).requires_grad_(True)
        sim_ref = (anchors @ refs.T).requires_grad_(True)
        ours = multi_similarity_loss(sim_ours, anchor_labels, ref_labels, ignore=ignore, **params)
        ref = loop_ms(sim_ref, anchor_labels, ref_labels=ref_labels, ignore=ignore, **params)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        ours.backward(), ref.backward()
        torch.testing.assert_close(sim_ours.grad, sim_ref.grad, rtol=1e-8, atol=1e-12)
        weights = pair_weights(
            sim_ours.detach(), anchor_labels, ref_labels, ignore=ignore, **params
        )
        assert weights.pos.shape == (10, 35) and (weights.pos[ignore] == 0).all()
    # the own copy (S = 1) is an easy positive that mining drops anyway; ignoring hard pairs
    # does change the loss, and the loop agrees
    sim = anchors @ refs.T
    hard = ignore | (sim > 0.3)
    changed = multi_similarity_loss(sim, anchor_labels, ref_labels, ignore=hard)
    torch.testing.assert_close(
        changed, loop_ms(sim, anchor_labels, ref_labels=ref_labels, ignore=hard)
    )
    assert not torch.isclose(
        changed, multi_similarity_loss(sim, anchor_labels, ref_labels, ignore=ignore)
    )


@pytest.mark.parametrize("ref_requires_grad", [True, False])
def test_module_with_ref_embeddings_gradients(ref_requires_grad):
    emb, labels = unit(12, 8, 31), pk_labels(12, 3)
    ref, ref_labels = unit(30, 8, 32), torch.arange(30) % 6
    ignore = torch.rand(12, 30, generator=torch.Generator().manual_seed(0)) < 0.1
    e1, r1 = emb.clone().requires_grad_(), ref.clone().requires_grad_(ref_requires_grad)
    e2, r2 = emb.clone().requires_grad_(), ref.clone().requires_grad_(ref_requires_grad)
    ours = MultiSimilarityLoss()(e1, labels, r1, ref_labels, ignore=ignore)
    expected = loop_ms(e2 @ r2.T, labels, ref_labels=ref_labels, ignore=ignore)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    ours.backward(), expected.backward()
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-8, atol=1e-12)
    if ref_requires_grad:
        torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-8, atol=1e-12)
    else:
        assert r1.grad is None


def test_grad_scales_with_upstream_gradient():
    x, labels = unit(16, 4, 5).requires_grad_(), pk_labels(16, 4)
    (3.0 * MultiSimilarityLoss()(x, labels)).backward()
    y = x.detach().clone().requires_grad_()
    loop_ms(y @ y.T, labels).backward()
    torch.testing.assert_close(x.grad, 3.0 * y.grad)


# ----------------------------------------------------------------------------- no valid anchor
NO_PAIRS = [(name, "b1") for name in PAIR_LOSSES] + [
    (name, case) for name in ("ms", "triplet", "lifted") for case in ("one_class", "singletons")
]
NO_PAIR_LABELS = {
    "b1": torch.zeros(1, dtype=torch.long),
    "one_class": torch.zeros(6, dtype=torch.long),
    "singletons": torch.arange(6),
}


@pytest.mark.parametrize("name,case", NO_PAIRS)
def test_no_valid_pairs_returns_zero_that_backpropagates(name, case):
    """Losses needing both kinds of pair get none from one class or singletons; B = 1 has none."""
    labels = NO_PAIR_LABELS[case]
    x = unit(len(labels), 4, 0, torch.float32).requires_grad_(True)
    loss = build_loss(name)(x, labels)
    assert loss.dim() == 0 and loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0
    sim = (x.detach() @ x.detach().T).requires_grad_(True)
    build_loss(name).from_sim(sim, labels).backward()
    assert sim.grad is not None and torch.count_nonzero(sim.grad) == 0


def test_functional_no_valid_anchor_backpropagates():
    sim = torch.rand(5, 5, requires_grad=True)
    loss = multi_similarity_loss(sim, torch.zeros(5, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(sim.grad) == 0


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_no_nan_intermediate_gradients_under_anomaly_detection(name):
    """Rows without pairs must not create NaN gradients anywhere in the graph (detect_anomaly
    raises on those even when a later `where` would drop them)."""
    x = unit(9, 4, 1, torch.float32).requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5])
    with torch.autograd.detect_anomaly():
        build_loss(name).from_sim(x @ x.T, labels).backward()
    assert torch.isfinite(x.grad).all()


def test_float_tie_keeps_one_kind_only_drops_the_anchor():
    """fl(a - m) < b but fl(b + m) <= a: the positive is kept, the negative is not; the
    released rule (both kept sets non-empty) drops the anchor."""
    a, b = 0.3132715515343597, 0.21327155153435973
    assert (a - 0.1 < b) and not (b + 0.1 > a)
    sim = torch.tensor([[1.0, a, b], [a, 1.0, -0.9], [b, -0.9, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    assert multi_similarity_loss(sim, labels).item() == 0.0 == loop_ms(sim, labels).item()
    assert pair_weights(sim, labels).pos.count_nonzero() == 0


def test_mining_can_leave_no_anchor():
    # positives far more similar than any negative: nothing is mined, loss is exactly 0
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    loss = MultiSimilarityLoss()(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


# ----------------------------------------------------------------------------- precision
def test_bf16_autocast_computes_in_float32():
    """Under CPU bf16 autocast the loss equals the float64 loop to 1e-5 (relative)."""
    x, labels = unit(64, 32, 41, torch.float32), pk_labels(64, 4)
    for params in (DEFAULTS, dict(DEFAULTS, beta=200.0)):
        ref = loop_ms(x.double() @ x.double().T, labels, **params)
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = MultiSimilarityLoss(**params)(xr, labels)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(xr.grad).all()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_finite_and_accurate(dtype):
    """Half embeddings: compared with the float64 loop on the same (rounded) values to 1e-5,
    and with the float64 loop on the unrounded values to 2e-2 (input rounding only)."""
    x, labels = unit(64, 32, 42, torch.float32), pk_labels(64, 4)
    for params in (DEFAULTS, dict(DEFAULTS, beta=200.0)):
        xh = x.to(dtype).requires_grad_(True)
        loss = MultiSimilarityLoss(**params)(xh, labels)
        loss.backward()
        assert torch.isfinite(loss) and xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
        rounded = xh.detach().double()
        torch.testing.assert_close(
            loss.double(), loop_ms(rounded @ rounded.T, labels, **params), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            loss.double(),
            loop_ms(x.double() @ x.double().T, labels, **params),
            rtol=2e-2,
            atol=1e-3,
        )
        # a half-precision similarity matrix through the functional form stays finite too
        sim = (xh.detach() @ xh.detach().T).requires_grad_(True)
        functional = multi_similarity_loss(sim, labels, **params)
        functional.backward()
        assert torch.isfinite(functional) and torch.isfinite(sim.grad).all()


def test_fp16_autocast_if_supported():
    x, labels = unit(32, 16, 43, torch.float32).requires_grad_(True), pk_labels(32, 4)
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = MultiSimilarityLoss(beta=200.0)(x, labels)
    except RuntimeError as err:  # older torch builds without CPU fp16 autocast
        pytest.skip(f"CPU fp16 autocast unavailable: {err}")
    loss.backward()
    ref = loop_ms(x.detach().double() @ x.detach().double().T, labels, beta=200.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(x.grad).all()


def test_large_beta_finite_where_naive_float32_overflows():
    x, labels = unit(16, 4, 44, torch.float32), pk_labels(16, 4)
    sim = 3.0 * (x @ x.T)  # unnormalised dot products reach 3
    naive = torch.exp(200.0 * (sim - 0.5)).sum()
    assert not torch.isfinite(naive)  # the failure the stable form guards against
    loss = multi_similarity_loss(sim, labels, beta=200.0)
    ref = loop_ms(sim.double(), labels, beta=200.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- PML
def _pml_ms(x, labels, ref=None, ref_labels=None):
    from pytorch_metric_learning import losses, miners

    miner = miners.MultiSimilarityMiner(epsilon=0.1)
    loss = losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5)
    return loss(x, labels, miner(x, labels, ref, ref_labels), ref, ref_labels)


def test_pml_mined_pairs_are_ours():
    """Mining coincides with PML's MultiSimilarityMiner: strict inequalities against the
    un-mined sets, self excluded by index. (Our pair weights are non-zero exactly on
    the mined pairs of valid anchors; a keep-positive set is non-empty iff
    min_pos < max_neg + margin iff the keep-negative set is, so no anchor keeps one kind only.)"""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import miners

    for seed in range(5):
        x = unit(40, 6, 50 + seed)
        labels = torch.randint(0, 8, (40,), generator=torch.Generator().manual_seed(seed))
        a1, p, a2, n = miners.MultiSimilarityMiner(epsilon=0.1)(x, labels)
        weights = pair_weights(x @ x.T, labels)
        theirs_pos = torch.zeros(40, 40, dtype=torch.bool)
        theirs_neg = torch.zeros(40, 40, dtype=torch.bool)
        theirs_pos[a1, p], theirs_neg[a2, n] = True, True
        assert torch.equal(theirs_pos, weights.pos > 0)
        assert torch.equal(theirs_neg, weights.neg > 0)


def test_pml_loss_equals_ours():
    """PML's MultiSimilarityLoss(alpha=2, beta=40, base=0.5) fed by MultiSimilarityMiner(0.1)
    versus ours (released preset), on L2-normalised float64 embeddings.

    Coincide: the mined pairs (see above), each anchor's L_i (PML's logsumexp with
    add_one is log(1 + sum e^x), and an anchor with no mined pair gets 0), and the
    reduction: PML's MultiSimilarityLoss keeps the default MeanReducer (not
    AvgNonZeroReducer), a mean over all B anchors, i.e. sum_i L_i / B as the released code.
    Also the reference form: with ref_emb, neither excludes a diagonal.
    Differ:
    - PML returns 0 whenever the miner found at most one positive and at most one negative
      pair in the whole batch (a shortcut in GenericPairLoss); ours counts that anchor
      (test_pml_single_pair_shortcut_differs);
    - PML renormalises embeddings (CosineSimilarity); ours takes dot products as given (the
      contract), so on unit vectors the losses agree and PML's gradient is ours projected
      on the sphere's tangent space; off the sphere the losses differ;
    - PML keeps an anchor's positive (negative) term when only that kind was mined; ours
      (the released code) drops the anchor. Both kept sets are non-empty iff
      min_pos < max_neg + margin, so this differs only at floating-point ties.
    """
    pytest.importorskip("pytorch_metric_learning")
    anchors_without_pairs = 0  # makes sure the reduction claim is exercised
    for seed in range(5):
        x = unit(40, 6, 60 + seed)
        labels = torch.randint(0, 8, (40,), generator=torch.Generator().manual_seed(seed))
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = MultiSimilarityLoss.from_preset("released")(x1, labels)
        theirs = _pml_ms(x2, labels)
        torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-12)
        ours.backward(), theirs.backward()
        tangent = x1.grad - (x1.grad * x).sum(1, keepdim=True) * x
        torch.testing.assert_close(x2.grad, tangent, rtol=1e-7, atol=1e-10)
        anchors_without_pairs += int((ms_per_anchor(x @ x.T, labels) == 0).sum())
    assert anchors_without_pairs > 0
    # reference form (a memory bank): anchors against other embeddings
    ref, ref_labels = unit(30, 6, 69), torch.arange(30) % 8
    torch.testing.assert_close(
        _pml_ms(x, labels, ref, ref_labels),
        MultiSimilarityLoss()(x, labels, ref, ref_labels),
        rtol=1e-10,
        atol=1e-12,
    )
    # off the unit sphere the losses differ (PML normalises, we do not)
    assert not torch.isclose(_pml_ms(2 * x, labels), MultiSimilarityLoss()(2 * x, labels))


def test_pml_single_pair_shortcut_differs():
    """One anchor with one mined positive and one mined negative: PML returns 0, we do not."""
    pytest.importorskip("pytorch_metric_learning")
    angles = torch.tensor([0.0, math.pi / 3, -math.pi / 6], dtype=torch.float64)
    x = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 0, 1])
    ours = MultiSimilarityLoss()(x, labels)
    assert _pml_ms(x, labels).item() == 0.0
    torch.testing.assert_close(ours, loop_ms(x @ x.T, labels))
    assert ours.item() > 0


# ----------------------------------------------------------------------------- GPW family
def loop_contrastive(sim, labels, pos_margin=0.0, neg_margin=0.5):
    total = sim.new_zeros(())
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i == j:
                continue
            if labels[i] == labels[j]:
                total = total + torch.clamp(1 - pos_margin - sim[i, j], min=0)
            else:
                total = total + torch.clamp(sim[i, j] - neg_margin, min=0)
    return total / len(labels)


def loop_triplet(sim, labels, margin=0.1, mining="semihard"):
    total, count = sim.new_zeros(()), 0
    n = len(labels)
    for i in range(n):
        for j in range(n):
            if j == i or labels[j] != labels[i]:
                continue
            for k in range(n):
                if labels[k] == labels[i]:
                    continue
                sp, sn = sim[i, j], sim[i, k]
                if mining == "hard" and not sn >= sp:
                    continue
                if mining == "semihard" and not (sp - margin < sn < sp):
                    continue
                hinge = sn - sp + margin
                if hinge > 0:
                    total, count = total + hinge, count + 1
    return total / max(count, 1)


def loop_binomial(sim, labels, alpha=2.0, beta=50.0, lam=0.5):
    total = sim.new_zeros(())
    for i in range(len(labels)):
        pos = [sim[i, j] for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg = [sim[i, j] for j in range(len(labels)) if labels[j] != labels[i]]
        if pos:
            total = total + sum(torch.log(1 + torch.exp(alpha * (lam - s))) for s in pos) / len(pos)
        if neg:
            total = total + sum(torch.log(1 + torch.exp(beta * (s - lam))) for s in neg) / len(neg)
    return total / len(labels)


def loop_lifted(sim, labels, margin=1.0):
    total = sim.new_zeros(())
    for i in range(len(labels)):
        pos = [sim[i, j] for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg = [sim[i, j] for j in range(len(labels)) if labels[j] != labels[i]]
        if pos and neg:
            value = torch.log(sum(torch.exp(margin - s) for s in pos)) + torch.log(
                sum(torch.exp(s) for s in neg)
            )
            total = total + torch.clamp(value, min=0)
    return total / len(labels)


GPW_CASES = [
    ("contrastive", {}, loop_contrastive),
    ("contrastive", dict(pos_margin=0.2, neg_margin=0.0), loop_contrastive),
    ("triplet", dict(mining="all"), loop_triplet),
    ("triplet", dict(mining="hard", margin=0.2), loop_triplet),
    ("triplet", dict(mining="semihard", margin=0.3), loop_triplet),
    ("binomial", {}, loop_binomial),
    ("binomial", dict(alpha=5.0, beta=10.0, lam=0.0), loop_binomial),
    ("lifted", {}, loop_lifted),
    ("lifted", dict(margin=-3.0), loop_lifted),  # negative margin: some anchors clamp to 0
]


@pytest.mark.parametrize(
    "name,params,loop", GPW_CASES, ids=lambda v: str(v) if not callable(v) else ""
)
def test_gpw_losses_match_loops(name, params, loop):
    for seed in range(3):
        x = unit(14, 4, 70 + seed)
        labels = torch.cat([pk_labels(12, 3), torch.tensor([50, 51])])  # two singletons
        assert_matches_loop(
            lambda e: build_loss(name, **params)(e, labels), lambda s: loop(s, labels, **params), x
        )


def test_gpw_ms_equals_pair_weights():
    for seed in range(3):
        x, labels = unit(24, 6, 80 + seed), pk_labels(24, 4)
        for params in (DEFAULTS, PRESETS["paper"], PARAMS[2]):
            via_autograd = gpw_pair_weights("ms", x @ x.T, labels, **params)
            analytic = pair_weights(x @ x.T, labels, **params)
            torch.testing.assert_close(via_autograd.pos, analytic.pos, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(via_autograd.neg, analytic.neg, rtol=1e-9, atol=1e-12)


def test_gpw_weights_have_each_loss_shape():
    x, labels = unit(24, 6, 90), pk_labels(24, 4)
    sim = x @ x.T
    pos_mask = (labels[:, None] == labels[None, :]) & ~torch.eye(24, dtype=torch.bool)
    contrastive = gpw_pair_weights("contrastive", sim, labels)
    assert torch.equal(contrastive.pos, pos_mask.double())  # every positive weighs 1
    assert torch.equal(
        contrastive.neg, ((sim > 0.5) & ~pos_mask & ~torch.eye(24, dtype=torch.bool)).double()
    )
    lifted = gpw_pair_weights("lifted", sim, labels)  # softmax weights sum to 1
    active = lifted.pos.sum(1) > 0
    torch.testing.assert_close(
        lifted.pos.sum(1)[active], torch.ones(int(active.sum()), dtype=sim.dtype)
    )
    triplet = gpw_pair_weights("triplet", sim, labels, mining="all")  # counts of active triplets
    assert torch.equal(triplet.pos, triplet.pos.round()) and triplet.pos.sum() == triplet.neg.sum()


def test_losses_registry_and_forward_equals_from_sim():
    assert set(PAIR_LOSSES) == {"ms", "contrastive", "triplet", "binomial", "lifted"}
    assert {n for n, spec in LOSSES.items() if not spec.pairs} == {"proxy_anchor"}
    classes = dict(
        ms=MultiSimilarityLoss,
        contrastive=ContrastiveLoss,
        triplet=TripletLoss,
        binomial=BinomialDevianceLoss,
        lifted=LiftedStructureLoss,
    )
    assert all(isinstance(build_loss(name), cls) for name, cls in classes.items())
    assert build_loss("triplet", margin=0.3, mining="all").margin == 0.3
    x, labels = unit(16, 4, 91), pk_labels(16, 4)
    for name in PAIR_LOSSES:
        loss = build_loss(name)
        torch.testing.assert_close(loss(x, labels), loss.from_sim(x @ x.T, labels))


# ----------------------------------------------------------------------------- API, validation
def test_presets():
    assert PRESETS["released"] == dict(alpha=2.0, beta=40.0, lam=0.5, margin=0.1)
    assert PRESETS["paper"] == dict(alpha=2.0, beta=50.0, lam=1.0, margin=0.1)
    paper = MultiSimilarityLoss.from_preset("paper")
    assert (paper.alpha, paper.beta, paper.lam, paper.margin) == (2.0, 50.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="paper.*released|released.*paper"):
        MultiSimilarityLoss.from_preset("nope")


def test_input_validation():
    loss = MultiSimilarityLoss()
    x, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="2-D"):
        loss(torch.randn(4), labels)
    with pytest.raises(ValueError, match="2-D"):
        loss(torch.randn(4, 3, 2), labels)
    with pytest.raises(ValueError, match="empty"):
        loss(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class ids"):
        loss(x, labels.float())
    with pytest.raises(TypeError, match="integer class ids"):
        loss(x, ["cat", "cat", "dog", "dog"])
    with pytest.raises(ValueError, match="4 entries"):
        loss(x, torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="floating-point"):
        loss(torch.ones(4, 3, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="together"):
        loss(x, labels, ref_embeddings=torch.randn(5, 3))
    with pytest.raises(ValueError, match="dim"):
        loss(x, labels, torch.randn(5, 2), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore"):
        loss(x, labels, ignore=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="ref_labels"):
        multi_similarity_loss(torch.randn(4, 5), labels)
    with pytest.raises(ValueError, match="contrastive"):
        build_loss("nope")
    with pytest.raises(TypeError, match="triplet"):
        build_loss("triplet", bogus=1)
    with pytest.raises(ValueError, match="semihard"):
        TripletLoss(mining="easy")
    # labels given as a plain list of ints are accepted
    assert torch.isfinite(loss(x, [0, 0, 1, 1]))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    n_classes=st.integers(1, 4),
    dim=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    alpha=st.floats(0.1, 20),
    beta=st.floats(1, 200),
    lam=st.floats(-1, 1),
    margin=st.floats(0, 1.5),  # the loss refuses negative margins
    scale=st.floats(0.1, 3),
)
def test_property_ms_finite_nonnegative_equals_loop(
    n, n_classes, dim, seed, alpha, beta, lam, margin, scale
):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, dim, generator=g, dtype=torch.float64)  # not normalised
    labels = torch.randint(0, n_classes, (n,), generator=g)
    params = dict(alpha=alpha, beta=beta, lam=lam, margin=margin)
    loss = MultiSimilarityLoss(**params)(x.float(), labels)
    assert torch.isfinite(loss) and loss.item() >= 0
    ref = loop_ms(x @ x.T, labels, **params)
    exact = MultiSimilarityLoss(**params)(x, labels)
    torch.testing.assert_close(exact, ref, rtol=1e-9, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 10),
    n_classes=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(PAIR_LOSSES),
)
def test_property_gpw_losses_finite_nonnegative(n, n_classes, seed, name):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, 3, generator=g), dim=1).requires_grad_(True)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    loss = build_loss(name)(x, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0 and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x, labels = unit(64, 32, 95, torch.float32), pk_labels(64, 4)
    xc = x.cuda().requires_grad_(True)
    xh = x.clone().requires_grad_(True)
    on_gpu = MultiSimilarityLoss()(xc, labels.cuda())
    on_cpu = MultiSimilarityLoss()(xh, labels)
    on_gpu.backward(), on_cpu.backward()
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(xc.grad.cpu(), xh.grad, rtol=1e-3, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.float16):
        half = MultiSimilarityLoss(beta=200.0)(xc, labels)  # labels on CPU are moved
    assert torch.isfinite(half)
    for name in PAIR_LOSSES:
        assert torch.isfinite(build_loss(name)(xc, labels.cuda()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mined_pairs_are_exactly_the_pairs_with_weight(seed):
    """`mined_pairs` (what the notebook draws) and `pair_weights` (what the loss uses) agree."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(24, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (24,), generator=g)
    sim = x @ x.T
    kept_pos, kept_neg = mined_pairs(sim, labels, margin=0.1)
    w = pair_weights(sim, labels, margin=0.1)
    assert torch.equal(kept_pos, w.pos > 0) and torch.equal(kept_neg, w.neg > 0)
    assert kept_pos.any() and kept_neg.any()


# ----------------------------------------------------------------------------- readable vs fast
def test_losses_module_opens_with_the_readable_definition():
    """The first function of losses.py is multi_similarity_loss, at most 40 lines of body,
    and MS's released numbers are written once (in PRESETS)."""
    import ast
    import inspect

    from msl_kit.losses import multi_similarity as losses

    source = inspect.getsource(losses)
    first = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef))
    assert first.name == "multi_similarity_loss"
    assert first.end_lineno - first.body[0].end_lineno <= 40  # body after the docstring
    assert source.count("40.0") == 1 and "beta=40.0" in source.split("PRESETS")[1]


@pytest.mark.parametrize("mining", ["ms", "none"])
@pytest.mark.parametrize("params", PARAMS[:3] + PARAMS[4:], ids=str)
@pytest.mark.parametrize("case", batches(), ids=lambda c: c[0])
def test_fast_path_equals_readable_definition(case, params, mining):
    """Every fast entry point (from_sim, per_anchor, the embeddings module) gives the readable
    multi_similarity_loss's value and gradient, with MS mining and without."""
    _, x, labels = case
    params = {**params, "mining": mining}
    s_read, s_fast = (x @ x.T).requires_grad_(True), (x @ x.T).requires_grad_(True)
    readable = multi_similarity_loss(s_read, labels, **params)
    fast = MultiSimilarityLoss(**params).from_sim(s_fast, labels)
    torch.testing.assert_close(fast, readable, rtol=1e-12, atol=1e-14)
    readable.backward(), fast.backward()
    torch.testing.assert_close(s_fast.grad, s_read.grad, rtol=1e-10, atol=1e-14)
    rows = ms_per_anchor(x @ x.T, labels, **params)
    torch.testing.assert_close(rows.sum() / len(rows), readable.detach(), rtol=1e-12, atol=1e-14)
    x_fast, x_read = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    MultiSimilarityLoss(**params)(x_fast, labels).backward()
    multi_similarity_loss(x_read @ x_read.T, labels, **params).backward()
    torch.testing.assert_close(x_fast.grad, x_read.grad, rtol=1e-9, atol=1e-13)


def test_fast_path_equals_readable_with_references_and_ignore():
    anchors, labels = unit(10, 6, 23), pk_labels(10, 2)
    refs, ref_labels = unit(30, 6, 24), torch.arange(30) % 7
    ignore = torch.rand(10, 30, generator=torch.Generator().manual_seed(2)) < 0.2
    s_read, s_fast = (
        (anchors @ refs.T).requires_grad_(True),
        (anchors @ refs.T).requires_grad_(True),
    )
    readable = multi_similarity_loss(s_read, labels, ref_labels, ignore=ignore)
    fast = MultiSimilarityLoss().from_sim(s_fast, labels, ref_labels, ignore=ignore)
    torch.testing.assert_close(fast, readable, rtol=1e-12, atol=1e-14)
    readable.backward(), fast.backward()
    torch.testing.assert_close(s_fast.grad, s_read.grad, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- NaN inputs
def test_nan_embedding_gives_nan_loss_never_a_finite_number():
    """Choice: a NaN among an anchor's pairs makes the loss NaN (no sync, no exception, as
    torch's own losses do); mining alone would have dropped the NaN pairs and returned 0."""
    x, labels = unit(12, 4, 3, torch.float32), pk_labels(12, 3)
    x[5, 1] = float("nan")
    assert torch.isnan(MultiSimilarityLoss()(x, labels))
    assert torch.isnan(MultiSimilarityLoss()(x.double(), labels))
    sim = x @ x.T
    assert torch.isnan(multi_similarity_loss(sim, labels))
    assert torch.isnan(MultiSimilarityLoss().from_sim(sim, labels))
    assert torch.isnan(ms_per_anchor(sim, labels)).all()  # the NaN row meets every anchor
    x[5, 1] = float("inf")
    assert not torch.isfinite(MultiSimilarityLoss()(x, labels))


# ----------------------------------------------------------------------------- mining stats
STAT_KEYS = {
    "pos_kept",
    "neg_kept",
    "w_pos_mean",
    "w_pos_max",
    "w_neg_mean",
    "w_neg_max",
    "sim_pos_q10",
    "sim_pos_q50",
    "sim_pos_q90",
    "sim_neg_q10",
    "sim_neg_q50",
    "sim_neg_q90",
}


@pytest.mark.parametrize("case", batches()[:5] + batches()[-2:], ids=lambda c: c[0])
def test_mining_stats_against_pair_weights(case):
    from msl_kit.losses import mining_stats

    _, x, labels = case
    sim = x @ x.T
    for params in (DEFAULTS, PARAMS[2]):
        stats = mining_stats(sim, labels, MSParams(**params))
        assert set(stats) == STAT_KEYS and all(isinstance(v, float) for v in stats.values())
        w = pair_weights(sim, labels, **params)
        kept_pos, kept_neg = mined_pairs(sim, labels, margin=params["margin"])
        same = labels[:, None] == labels[None, :]
        pos_mask, neg_mask = same & ~torch.eye(len(labels), dtype=torch.bool), ~same
        for kind, kept, mask, weights in (
            ("pos", kept_pos, pos_mask, w.pos),
            ("neg", kept_neg, neg_mask, w.neg),
        ):
            assert stats[f"{kind}_kept"] == pytest.approx(kept.sum().item() / mask.sum().item())
            assert stats[f"w_{kind}_mean"] == pytest.approx(weights[kept].mean().item(), rel=1e-12)
            assert stats[f"w_{kind}_max"] == pytest.approx(weights.max().item(), rel=1e-12)
            expected = torch.quantile(sim[mask], torch.tensor([0.1, 0.5, 0.9], dtype=sim.dtype))
            got = [stats[f"sim_{kind}_q{q}"] for q in (10, 50, 90)]
            assert got == pytest.approx(expected.tolist(), rel=1e-12)


def test_mining_stats_empty_sets_are_nan():
    from msl_kit.losses import mining_stats

    stats = mining_stats(
        torch.eye(4), torch.arange(4), MSParams(**DEFAULTS)
    )  # no positive pair at all
    assert all(math.isnan(stats[k]) for k in STAT_KEYS if "pos" in k)
    assert stats["neg_kept"] == 0.0 and math.isnan(stats["w_neg_mean"])
    assert stats["sim_neg_q50"] == 0.0


# ----------------------------------------------------------------------------- mining option
def loop_pairs(sim, labels, margin=0.1, mining="ms"):
    """Per anchor: (kept positive, kept negative) column lists; MS mining or every pair; both
    lists empty for anchors that lack either kind."""
    out = []
    for i in range(len(labels)):
        pos = [j for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(len(labels)) if labels[j] != labels[i]]
        if pos and neg and mining == "ms":
            min_pos, max_neg = min(sim[i, j] for j in pos), max(sim[i, k] for k in neg)
            pos = [j for j in pos if sim[i, j] - margin < max_neg]
            neg = [k for k in neg if sim[i, k] + margin > min_pos]
        out.append((pos, neg) if (pos and neg) or mining == "none" else ([], []))
    return out


def loop_ms_no_mining(sim, labels, alpha=2.0, beta=40.0, lam=0.5, margin=0.1):
    """The paper's equation over every pair: each term on its own, so an anchor without a
    positive (a singleton class) keeps its negative term."""
    total = sim.new_zeros(())
    for i, (pos, neg) in enumerate(loop_pairs(sim, labels, mining="none")):
        if pos:
            total = (
                total + torch.log1p(sum(torch.exp(-alpha * (sim[i, j] - lam)) for j in pos)) / alpha
            )
        if neg:
            total = (
                total + torch.log1p(sum(torch.exp(beta * (sim[i, k] - lam)) for k in neg)) / beta
            )
    return total / len(labels)


def loop_binomial_ms(sim, labels, alpha=2.0, beta=50.0, lam=0.5, mining_margin=0.1):
    total = sim.new_zeros(())
    for i, (pos, neg) in enumerate(loop_pairs(sim, labels, mining_margin)):
        if pos:
            total = total + sum(F.softplus(alpha * (lam - sim[i, j])) for j in pos) / len(pos)
            total = total + sum(F.softplus(beta * (sim[i, k] - lam)) for k in neg) / len(neg)
    return total / len(labels)


def loop_contrastive_ms(sim, labels, pos_margin=0.0, neg_margin=0.5, mining_margin=0.1):
    total = sim.new_zeros(())
    for i, (pos, neg) in enumerate(loop_pairs(sim, labels, mining_margin)):
        total = total + sum(
            (torch.clamp(1 - pos_margin - sim[i, j], min=0) for j in pos), sim.new_zeros(())
        )
        total = total + sum(
            (torch.clamp(sim[i, k] - neg_margin, min=0) for k in neg), sim.new_zeros(())
        )
    return total / len(labels)


MINING_CASES = [
    ("ms", dict(mining="none"), loop_ms_no_mining),
    ("ms", dict(mining="none", alpha=10.0, beta=100.0, lam=0.2), loop_ms_no_mining),
    ("binomial", dict(mining="ms"), loop_binomial_ms),
    ("binomial", dict(mining="ms", mining_margin=0.3, beta=10.0), loop_binomial_ms),
    ("contrastive", dict(mining="ms"), loop_contrastive_ms),
    ("contrastive", dict(mining="ms", mining_margin=0.0, neg_margin=0.1), loop_contrastive_ms),
]


@pytest.mark.parametrize(
    "name,params,loop", MINING_CASES, ids=lambda v: str(v) if not callable(v) else ""
)
def test_mining_option_matches_loops(name, params, loop):
    loop_params = {k: v for k, v in params.items() if k != "mining"}
    for seed in range(3):
        x = unit(14, 4, 170 + seed)
        labels = torch.cat([pk_labels(12, 3), torch.tensor([50, 51])])  # two singletons
        assert_matches_loop(
            lambda e: build_loss(name, **params)(e, labels),
            lambda s: loop(s, labels, **loop_params),
            x,
        )


def test_mining_option_defaults_and_validation():
    assert build_loss("ms").mining == "ms"
    assert build_loss("binomial").mining == build_loss("contrastive").mining == "none"
    x, labels = unit(20, 6, 5), pk_labels(20, 4)
    # MS weighting without mining is a different loss on this batch; with mining it is MS
    assert not torch.isclose(
        build_loss("ms", mining="none")(x, labels), build_loss("ms")(x, labels)
    )
    mined = build_loss("contrastive", mining="ms")(x, labels)
    assert mined < build_loss("contrastive")(x, labels)
    for name in ("ms", "binomial", "contrastive"):
        for bad in ("MS", "all", "", None, "semihard"):
            with pytest.raises(ValueError, match="'ms'.*'none'"):
                build_loss(name, mining=bad)
    with pytest.raises(ValueError, match="'ms'.*'none'"):
        ms_per_anchor(x @ x.T, labels, mining="hard")
