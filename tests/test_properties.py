"""Property tests (hypothesis) across modules: what test_losses.py / test_metrics.py check on
fixed batches or in float64, checked here over random inputs and parameters.

- the MS loss and its gradient in fp32 / fp16 / bf16 (and under bf16 autocast) against a
  float64 per-anchor loop on the same (rounded) values: finite, non-negative, equal;
- pair_weights in half precision against autograd of the loop;
- the loss is invariant to the batch order and to the names of the labels;
- the metrics: in [0, 1], recall monotone in K, invariant to permuting queries, gallery and
  label names (query = gallery and query / gallery forms);
- loss and metrics agree on perfectly separated classes (loss 0, every metric 1);
- checkpoints: an interrupted atomic write never changes the old file; random states
  survive a save / load exactly.

Examples are derandomized so CI sees the same cases every run; the whole file takes ~20 s.
"""

from __future__ import annotations

import errno
import math
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msl_kit.files.atomic import atomic_write_bytes
from msl_kit.losses import MultiSimilarityLoss, pair_weights
from msl_kit.metrics import retrieval_metrics
from msl_kit.train import checkpoint as ckpt

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


# ----------------------------------------------------------------------------- the loss
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


# ----------------------------------------------------------------------------- the metrics
def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], abs=1e-12) for k in a
    )


@settings(max_examples=40, **SETTINGS)
@given(
    n=st.integers(3, 40),
    dim=st.integers(1, 6),
    n_classes=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    split=st.one_of(st.none(), st.floats(0.2, 0.8)),
    data=st.data(),
)
def test_metrics_bounded_monotone_and_invariant_to_order_and_label_names(
    n, dim, n_classes, seed, split, data
):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)  # continuous: no ties to break by index
    labels = rng.integers(0, n_classes, n)
    names = rng.permutation(10**6)[:n_classes] - 500_000  # any distinct integers, negative too
    if split is None:
        q, ql, g, gl = x, labels, None, None
        size = n - 1
    else:
        cut = min(max(1, round(split * n)), n - 1)
        q, ql, g, gl = x[:cut], labels[:cut], x[cut:], labels[cut:]
        size = n - cut
    ks = tuple(sorted(set(data.draw(st.lists(st.integers(1, size), min_size=1, max_size=4)))))

    def run(qp, gp, rename=lambda y: y):
        gallery = {} if g is None else dict(gallery=g[gp], gallery_labels=rename(gl[gp]))
        return retrieval_metrics(q[qp], rename(ql[qp]), ks, max_r=None, **gallery)

    ident_q, ident_g = np.arange(len(q)), None if g is None else np.arange(len(g))
    out = run(ident_q, ident_g)
    recalls = [out[f"recall@{k}"] for k in ks]
    assert all(0.0 <= v <= 1.0 for v in recalls) and recalls == sorted(recalls)
    for key in ("map@r", "r_precision"):
        assert math.isnan(out[key]) or 0.0 <= out[key] <= 1.0
    assert math.isnan(out["r_precision"]) or out["map@r"] <= out["r_precision"] + 1e-12
    perm_q = rng.permutation(len(q))
    perm_g = None if g is None else rng.permutation(len(g))
    assert _same(run(perm_q, ident_g), out)
    if g is not None:
        assert _same(run(ident_q, perm_g), out)
    assert _same(run(perm_q, perm_g, rename=lambda y: names[y]), out)


# ----------------------------------------------------------------------------- loss x metrics
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


# ----------------------------------------------------------------------------- checkpoints
@settings(max_examples=40, **SETTINGS)
@given(
    old=st.binary(max_size=300),
    new=st.binary(min_size=1, max_size=300),
    cut=st.integers(0, 300),
    error=st.sampled_from([errno.ENOSPC, errno.EIO, errno.EDQUOT]),
)
def test_an_interrupted_atomic_write_never_changes_the_old_file(old, new, cut, error):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pt"
        path.write_bytes(old)

        def write(f):
            f.write(new[:cut])
            raise OSError(error, "simulated")

        with pytest.raises(OSError) as info:
            atomic_write_bytes(path, write)
        assert info.value.errno == error and str(path) in str(info.value)
        assert path.read_bytes() == old and sorted(p.name for p in Path(folder).iterdir()) == [
            "checkpoint.pt"
        ]
        atomic_write_bytes(path, lambda f: f.write(new))
        assert path.read_bytes() == new and len(list(Path(folder).iterdir())) == 1


@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2**31), before=st.integers(0, 700), after=st.integers(1, 50))
def test_random_states_survive_a_checkpoint_exactly(seed, before, after):
    def draws() -> tuple:
        return (
            [random.random() for _ in range(after)],
            np.random.standard_normal(after).tolist(),
            np.random.randint(0, 2**31, after).tolist(),
            torch.rand(after).tolist(),
        )

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    for _ in range(
        before
    ):  # leave every generator somewhere in its stream (numpy's gauss cache too)
        random.random(), np.random.standard_normal(), torch.rand(1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pt"
        ckpt.save_checkpoint({"model": {}, "rng": ckpt.rng_state()}, path)
        expected = draws()
        draws()  # move on, then restore from the file
        ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"])
        assert draws() == expected
