"""Property tests (hypothesis) of the MS loss over random inputs and parameters, what
test_losses.py checks on fixed batches or in float64:

- the loss and its gradient in fp32 / fp16 / bf16 (and under bf16 autocast) against a float64
  per-anchor loop on the same (rounded) values: finite, non-negative, equal;
- pair_weights in half precision against autograd of the loop;
- the loss is invariant to the batch order and to the names of the labels;
- loss and metrics agree on perfectly separated classes (loss 0, every metric 1).

Examples are derandomized so CI sees the same cases every run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msl_kit.losses import MultiSimilarityLoss, pair_weights
from msl_kit.metrics import retrieval_metrics

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


ms_params = st.fixed_dictionaries(
    dict(
        alpha=st.floats(0.1, 20),
        beta=st.floats(1, 200),
        lam=st.floats(-1, 1),
        margin=st.floats(0, 1.5),  # the loss refuses negative margins
    )
)


def naive_ms(
    sim: torch.Tensor, labels: list[int], alpha: float, beta: float, lam: float, margin: float
) -> torch.Tensor:
    """The MS loss of DESIGN.md anchor by anchor (differentiable, for float64 references)."""
    n, total, zero = sim.shape[0], sim.sum() * 0, sim.new_zeros(())  # connected even with no anchor
    for i in range(n):
        pos = [sim[i, j] for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [sim[i, k] for k in range(n) if labels[k] != labels[i]]
        if not pos or not neg:
            continue
        min_pos, max_neg = min(pos), max(neg)
        kept_pos = [s for s in pos if s - margin < max_neg]
        kept_neg = [s for s in neg if s + margin > min_pos]
        if not kept_pos or not kept_neg:
            continue
        total = (
            total
            + torch.logsumexp(torch.stack([zero, *(-alpha * (s - lam) for s in kept_pos)]), 0)
            / alpha
        )
        total = (
            total
            + torch.logsumexp(torch.stack([zero, *(beta * (s - lam) for s in kept_neg)]), 0) / beta
        )
    return total / n


def random_batch(seed: int, n: int, n_classes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return x, torch.randint(0, n_classes, (n,), generator=g)


@settings(max_examples=40, **SETTINGS)
@given(
    n=st.integers(2, 14),
    n_classes=st.integers(1, 5),
    dim=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    params=ms_params,
    mode=st.sampled_from(["fp32", "fp16", "bf16", "autocast-bf16"]),
)
def test_ms_loss_and_gradient_in_every_precision_equal_the_float64_loop(
    n, n_classes, dim, seed, params, mode
):
    x64, labels = random_batch(seed, n, n_classes, dim)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(mode, torch.bfloat16)
    x = x64.to(torch.float32 if mode.startswith("autocast") else dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("autocast")):
        loss = MultiSimilarityLoss(**params)(x, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() >= 0
    assert x.grad.dtype == x.dtype and torch.isfinite(x.grad).all()
    # the reference sees the same rounded inputs; only the loss's own arithmetic may differ
    rounded = x.detach().double().requires_grad_(True)
    ref = naive_ms(rounded @ rounded.T, labels.tolist(), **params)
    ref.backward()
    assert ref.item() >= 0
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    # gradients: float32 maths, then rounded to the input dtype
    tol = max(1e-4, 4 * EPS[x.dtype])
    torch.testing.assert_close(
        x.grad.double(), rounded.grad, rtol=tol, atol=tol * float(rounded.grad.abs().max()) + 1e-7
    )


@settings(max_examples=30, **SETTINGS)
@given(
    n=st.integers(2, 12),
    n_classes=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    params=ms_params,
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_pair_weights_in_half_precision_equal_autograd_of_the_loop(
    n, n_classes, seed, params, dtype
):
    x64, labels = random_batch(seed, n, n_classes, 4)
    sim = (x64 @ x64.T).to(dtype)
    weights = pair_weights(sim, labels, **params)
    assert torch.isfinite(weights.pos).all() and torch.isfinite(weights.neg).all()
    assert (weights.pos >= 0).all() and (weights.neg >= 0).all()
    leaf = sim.double().requires_grad_(True)
    # DESIGN.md: w = -/+ dL/dS with L = sum_i L_i, i.e. n times the mean the loop returns
    (grad,) = torch.autograd.grad(
        n * naive_ms(leaf, labels.tolist(), **params), leaf, allow_unused=True
    )
    grad = torch.zeros_like(leaf) if grad is None else grad
    same = labels[:, None] == labels[None, :]
    tol = dict(rtol=1e-4, atol=1e-6 * (1 + float(grad.abs().max())))
    torch.testing.assert_close(weights.pos.double(), torch.where(same, -grad, 0.0), **tol)
    torch.testing.assert_close(weights.neg.double(), torch.where(~same, grad, 0.0), **tol)


@settings(max_examples=30, **SETTINGS)
@given(
    n=st.integers(2, 16),
    n_classes=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    params=ms_params,
    names=st.lists(st.integers(-(2**40), 2**40), min_size=5, max_size=5, unique=True),
)
def test_ms_loss_ignores_batch_order_and_label_names(n, n_classes, seed, params, names):
    x, labels = random_batch(seed, n, n_classes, 6)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    renamed = torch.tensor(names)[labels]
    a = x.clone().requires_grad_(True)
    b = x[perm].clone().requires_grad_(True)
    loss_a = MultiSimilarityLoss(**params)(a, labels)
    loss_b = MultiSimilarityLoss(**params)(b, renamed[perm])
    (loss_a + loss_b).backward()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.grad, a.grad[perm], rtol=1e-10, atol=1e-14)


@settings(max_examples=25, **SETTINGS)
@given(
    sizes=st.lists(st.integers(2, 5), min_size=2, max_size=6),
    seed=st.integers(0, 2**16),
    params=st.fixed_dictionaries(
        dict(
            alpha=st.floats(0.1, 20),
            beta=st.floats(1, 200),
            lam=st.floats(-1, 1),
            margin=st.floats(0, 0.9),  # the loss refuses negative margins
        )
    ),
)
def test_separated_classes_give_zero_loss_and_perfect_retrieval(sizes, seed, params):
    """One orthonormal direction per class: the miner keeps no negative (S = 0 + margin < 1 = S+),
    so the loss is exactly 0 with no gradient, and every retrieval metric is 1."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(len(sizes) + 2, len(sizes), generator=g))
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    order = torch.randperm(len(labels), generator=g)
    labels = labels[order]
    x = basis.T[labels].contiguous().requires_grad_(True)
    loss = MultiSimilarityLoss(**params)(x, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    ks = tuple(range(1, min(sizes)))
    out = retrieval_metrics(x.detach(), labels, ks or (1,))
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in out.values()), out
