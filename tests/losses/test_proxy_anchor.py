"""Proxy-Anchor: equal to pytorch-metric-learning and to a naive per-proxy loop, in value and
gradient; its GPW weights equal autograd; bad arguments are one-line errors; autocast is fp32."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from msl_kit.losses.proxy_anchor import ProxyAnchorLoss, proxy_anchor_loss, proxy_weights

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

# (batch labels, number of classes): random, a class with a single sample, few classes.
BATCHES = [
    (torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(0)), 10),
    (torch.tensor([0, 0, 1, 1, 2, 3, 3, 3, 5]), 7),  # classes 2 and 5 have one sample each
    (torch.tensor([4, 4, 4, 9, 9, 9]), 12),  # two of twelve proxies have positives
    (torch.tensor([3]), 5),  # a single sample: one positive proxy, four negatives
]


def naive_loss(x: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, margin, alpha):
    """The paper's equation, one proxy at a time, in float64."""
    x, proxies = F.normalize(x.double(), dim=1), F.normalize(proxies.double(), dim=1)
    pos_sum, neg_sum, n_pos = 0.0, 0.0, 0
    for c in range(proxies.shape[0]):
        s = x @ proxies[c]
        is_pos = labels == c
        if is_pos.any():
            n_pos += 1
            pos_sum = pos_sum + torch.log1p(torch.exp(-alpha * (s[is_pos] - margin)).sum())
        neg_sum = neg_sum + torch.log1p(torch.exp(alpha * (s[~is_pos] + margin)).sum())
    return pos_sum / n_pos + neg_sum / proxies.shape[0]


def _ours_and_pml(num_classes: int, dim: int, margin: float, alpha: float, seed: int):
    torch.manual_seed(seed)
    ours = ProxyAnchorLoss(num_classes, dim, margin=margin, alpha=alpha)
    pml = pml_losses.ProxyAnchorLoss(num_classes, dim, margin=margin, alpha=alpha)
    with torch.no_grad():
        pml.proxies.copy_(ours.proxies)  # PML normalises its proxies itself (CosineSimilarity)
    return ours, pml


@pytest.mark.parametrize("margin,alpha", [(0.1, 32.0), (0.3, 8.0)])
@pytest.mark.parametrize("case", range(len(BATCHES)))
def test_equals_pml_loss_and_gradients(case, margin, alpha):
    labels, num_classes = BATCHES[case]
    dim = 16
    ours, pml = _ours_and_pml(num_classes, dim, margin, alpha, seed=case)
    x = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(10 + case))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = ours(x1, labels), pml(x2, labels)
    got.backward()
    want.backward()
    assert got.shape == () and torch.isfinite(got)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.proxies.grad, pml.proxies.grad, atol=1e-5, rtol=1e-5)
    assert x1.grad.abs().sum() > 0 and ours.proxies.grad.abs().sum() > 0


@pytest.mark.parametrize("case", range(len(BATCHES)))
def test_equals_naive_loop_in_float64(case):
    labels, num_classes = BATCHES[case]
    torch.manual_seed(case)
    loss = ProxyAnchorLoss(num_classes, 8, margin=0.1, alpha=32.0).double()
    x = torch.randn(len(labels), 8, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    p_ref = loss.proxies.detach().clone().requires_grad_()
    got, want = loss(x, labels), naive_loss(x_ref, labels, p_ref, 0.1, 32.0)
    got.backward()
    want.backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(loss.proxies.grad, p_ref.grad, atol=1e-12, rtol=1e-12)


def test_large_alpha_stays_finite_where_naive_overflows():
    labels = torch.tensor([0, 0, 1, 2])
    loss = ProxyAnchorLoss(3, 4, alpha=1000.0)
    with torch.no_grad():  # every sample far from its proxy and close to the others
        loss.proxies.copy_(torch.eye(3, 4))
    x = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [1.0, 0, 0, 0], [0, 1, 0, 0]])
    x.requires_grad_()
    value = loss(x, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all() and value > 100
    assert not torch.isfinite(naive_loss(x.detach(), labels, loss.proxies.detach(), 0.1, 1000.0))


def test_proxy_weights_equal_autograd():
    torch.manual_seed(3)
    for labels, num_classes in BATCHES:
        sim = (torch.rand(len(labels), num_classes, dtype=torch.float64) * 2 - 1).requires_grad_()
        proxy_anchor_loss(sim, labels, margin=0.1, alpha=16.0).backward()
        w = proxy_weights(sim.detach(), labels, margin=0.1, alpha=16.0)
        pos = F.one_hot(labels, num_classes).bool()
        torch.testing.assert_close(w.pos, torch.where(pos, -sim.grad, 0.0))
        torch.testing.assert_close(w.neg, torch.where(pos, 0.0, sim.grad))
        assert (w.pos >= 0).all() and (w.neg >= 0).all()
        assert (w.pos[~pos] == 0).all() and (w.neg[pos] == 0).all()
        assert (w.pos[pos] > 0).all() and (w.neg[~pos] > 0).all()


def test_proxy_weights_put_more_weight_on_the_harder_positive():
    sim = torch.tensor([[0.9, 0.0], [0.1, 0.0]])  # both of class 0; the second is far
    w = proxy_weights(sim, torch.tensor([0, 0]))
    assert w.pos[1, 0] > 100 * w.pos[0, 0]


def test_init_is_kaiming_fan_out_like_the_released_code():
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(200, 512)
    assert loss.proxies.shape == (200, 512) and loss.proxies.requires_grad
    # kaiming_normal_(mode="fan_out") on (C, D): std = sqrt(2 / C)
    assert loss.proxies.std().item() == pytest.approx(math.sqrt(2 / 200), rel=0.02)
    assert "proxies" in loss.state_dict()


def test_empty_batch_is_zero_with_a_gradient():
    loss = ProxyAnchorLoss(4, 3)
    value = loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    value.backward()
    assert value.item() == 0.0 and loss.proxies.grad is not None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=0, dim=8), "num_classes must be an integer >= 1"),
        (dict(num_classes=2.5, dim=8), "num_classes must be an integer >= 1"),
        (dict(num_classes=3, dim=0), "dim must be an integer >= 1"),
        (dict(num_classes=3, dim=8, alpha=0.0), "alpha = 0.0 is not allowed: use a value > 0"),
        (dict(num_classes=3, dim=8, alpha=math.inf), "alpha = inf is not allowed"),
        (dict(num_classes=3, dim=8, margin=math.nan), "margin = nan is not allowed"),
    ],
)
def test_bad_constructor_arguments_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        ProxyAnchorLoss(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "x,labels,match",
    [
        (torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), r"labels must lie in \[0, 3\)"),
        (torch.randn(4, 8), torch.tensor([0, 1, -1, 2]), r"labels must lie in \[0, 3\)"),
        (torch.randn(4, 8), torch.tensor([0, 1, 2]), "one per row"),
        (torch.randn(4, 8), torch.tensor([0.0, 1, 2, 1]), "integer class ids, got dtype"),
        (torch.randn(4, 5), torch.tensor([0, 1, 2, 1]), r"embeddings must be \(batch, 8\)"),
    ],
)
def test_bad_batches_are_one_line(x, labels, match):
    with pytest.raises((ValueError, TypeError), match=match) as e:
        ProxyAnchorLoss(3, 8)(x, labels)
    assert "\n" not in str(e.value)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_finite_and_computed_in_fp32(device, dtype):
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(10, 32).to(device)
    layer = torch.nn.Linear(16, 32).to(device)
    inputs = torch.randn(24, 16, device=device)
    labels = torch.randint(0, 10, (24,), device=device)
    with torch.autocast(device, dtype=dtype):
        emb = layer(inputs)
        assert emb.dtype == dtype  # autocast is really on
        value = loss(emb, labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(loss.proxies.grad).all()
    reference = loss(layer(inputs).detach(), labels)  # same input in fp32 throughout
    assert value.item() == pytest.approx(reference.item(), rel=0.05)
