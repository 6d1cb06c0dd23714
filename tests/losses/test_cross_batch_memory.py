"""Cross-batch memory: FIFO bookkeeping, the memory term against a naive loop and PML, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msl_kit.losses import MultiSimilarityLoss, multi_similarity_loss
from msl_kit.losses.memory import CrossBatchMemory, xbm_step_loss

ALPHA, BETA, LAM, MARGIN = 2.0, 40.0, 0.5, 0.1


def naive_memory_ms_loss(
    emb,
    labels,
    indices,
    mem_emb,
    mem_labels,
    mem_indices,
    alpha=ALPHA,
    beta=BETA,
    lam=LAM,
    margin=MARGIN,
):
    """MS loss of each anchor against the memory, one anchor at a time (the paper's rule).

    References with the anchor's own dataset index are skipped; returns (loss, valid anchors).
    """
    total = emb.new_zeros(())
    valid = 0
    for i in range(emb.shape[0]):
        sims = [emb[i] @ mem_emb[m] for m in range(mem_emb.shape[0])]
        pos = [
            s
            for m, s in enumerate(sims)
            if mem_indices[m] != indices[i] and mem_labels[m] == labels[i]
        ]
        neg = [
            s
            for m, s in enumerate(sims)
            if mem_indices[m] != indices[i] and mem_labels[m] != labels[i]
        ]
        if not pos or not neg:
            continue
        min_pos = min(s.item() for s in pos)
        max_neg = max(s.item() for s in neg)
        kept_neg = [s for s in neg if s.item() + margin > min_pos]
        kept_pos = [s for s in pos if s.item() - margin < max_neg]
        if not kept_neg or not kept_pos:
            continue
        valid += 1
        pos_term = sum(torch.exp(-alpha * (s - lam)) for s in kept_pos)
        neg_term = sum(torch.exp(beta * (s - lam)) for s in kept_neg)
        total = total + torch.log1p(pos_term) / alpha + torch.log1p(neg_term) / beta
    return total / emb.shape[0], valid


def held(memory):
    """What the memory holds, (embeddings, labels, indices) in slot order (the loss ignores
    order)."""
    n = len(memory)
    return memory.embeddings[:n], memory.labels[:n], memory.indices[:n]


def as_multiset(emb, labels, indices):
    return sorted((int(i), int(y), tuple(e.tolist())) for e, y, i in zip(emb, labels, indices))


def random_batch(gen, n, dim, num_classes, num_items, dtype=torch.float64):
    emb = F.normalize(torch.randn(n, dim, generator=gen, dtype=dtype), dim=1)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    indices = torch.randint(0, num_items, (n,), generator=gen)
    return emb, labels, indices


def test_fifo_order_and_wraparound_match_a_list():
    gen = torch.Generator().manual_seed(0)
    memory = CrossBatchMemory(size=7)
    reference: list[tuple[list[float], int, int]] = []
    for n in [3, 2, 4, 1, 7, 9, 5, 6]:  # wraps several times; 7 and 9 fill it in one go
        emb = torch.randn(n, 2, generator=gen)
        labels = torch.randint(0, 5, (n,), generator=gen)
        indices = torch.randint(0, 100, (n,), generator=gen)
        memory.enqueue(emb, labels, indices)
        reference.extend((e.tolist(), int(y), int(i)) for e, y, i in zip(emb, labels, indices))
        expected = reference[-7:]  # FIFO: the newest 7 entries, whatever slots they sit in
        assert len(memory) == len(expected)
        assert as_multiset(*held(memory)) == sorted((i, y, tuple(e)) for e, y, i in expected)


def test_memory_term_matches_naive_loop_with_repeated_indices():
    gen = torch.Generator().manual_seed(1)
    memory = CrossBatchMemory(size=40)
    # Indices from a pool of 30 items, so the memory holds stale copies of current anchors too.
    earlier = []
    for _ in range(4):
        batch = random_batch(gen, 12, 6, 4, 30)
        memory.enqueue(*batch)
        earlier.append(batch[2])
    emb, labels, indices = random_batch(gen, 12, 6, 4, 30)
    emb.requires_grad_(True)
    memory.enqueue(emb.detach(), labels, indices)
    got = memory.loss(multi_similarity_loss, emb, labels, indices)
    fast = memory.loss(MultiSimilarityLoss().from_sim, emb, labels, indices)
    mem_emb, mem_labels, mem_indices = held(memory)
    expected, valid = naive_memory_ms_loss(emb, labels, indices, mem_emb, mem_labels, mem_indices)
    assert valid >= 6, "the reference case should have many valid anchors"
    assert len(memory) == 40
    surviving_earlier = torch.cat(earlier)[-28:]  # 40 slots - the current 12
    assert torch.isin(indices, surviving_earlier).any(), "the case should contain stale copies"
    torch.testing.assert_close(fast, expected, rtol=1e-12, atol=1e-12)
    (fast_grad,) = torch.autograd.grad(fast, emb)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(got, emb)
    (expected_grad,) = torch.autograd.grad(expected, emb)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_matches_pml_cross_batch_memory():
    from pytorch_metric_learning.losses import CrossBatchMemory as PMLMemory
    from pytorch_metric_learning.losses import MultiSimilarityLoss as PMLMS
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    gen = torch.Generator().manual_seed(2)
    size, dim = 48, 5
    theirs = PMLMemory(
        PMLMS(alpha=ALPHA, beta=BETA, base=LAM),
        dim,
        memory_size=size,
        miner=MultiSimilarityMiner(epsilon=MARGIN),
    )
    ours = CrossBatchMemory(size=size)
    # Distinct dataset indices: PML drops only the copy just enqueued, we drop by index; with
    # no stale copies the two rules coincide. Each class is a tight cluster so every anchor
    # has mined positives and negatives (where the two libraries agree on what a loss is).
    centres = F.normalize(torch.randn(4, dim, generator=gen, dtype=torch.float64), dim=1)
    next_index = 0
    for step in range(6):
        labels = torch.arange(4).repeat_interleave(3)
        emb = F.normalize(
            centres[labels] + 0.6 * torch.randn(12, dim, generator=gen, dtype=torch.float64), dim=1
        )
        indices = torch.arange(next_index, next_index + 12)
        next_index += 12
        emb_ours = emb.clone().requires_grad_(True)
        emb_theirs = emb.clone().requires_grad_(True)
        ours.enqueue(emb_ours.detach(), labels, indices)
        got = ours.loss(multi_similarity_loss, emb_ours, labels, indices)
        expected = theirs(emb_theirs, labels)
        if step > 0:  # the first batch alone holds only 2 positives per anchor
            mem = held(ours)
            _, valid = naive_memory_ms_loss(emb, labels, indices, *mem)
            assert valid == 12, "the peer comparison needs every anchor valid"
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-9, atol=1e-12)
        (grad_ours,) = torch.autograd.grad(got, emb_ours)
        (grad_theirs,) = torch.autograd.grad(expected, emb_theirs)
        # PML normalises inside its cosine similarity, so its gradient is ours with the
        # radial part projected out (x is unit length): (I - x x^T) g.
        tangent = grad_ours - (grad_ours * emb).sum(1, keepdim=True) * emb
        assert tangent.abs().max() > 1e-3
        torch.testing.assert_close(tangent, grad_theirs.to(grad_ours.dtype), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("mining", ["none", "ms"])
def test_contrastive_with_memory_matches_pml_cross_batch_memory(mining):
    """Cross-batch memory is not MS-only: contrastive + memory equals PML's CrossBatchMemory
    around its ContrastiveLoss (cosine similarity, pos_margin 1, neg_margin 0.5). PML sums
    pair losses with SumReducer; ours is sum_i L_i / B, so ours x B is PML's sum."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import ContrastiveLoss as PMLContrastive
    from pytorch_metric_learning.losses import CrossBatchMemory as PMLMemory
    from pytorch_metric_learning.miners import MultiSimilarityMiner
    from pytorch_metric_learning.reducers import SumReducer

    from msl_kit.losses import build_loss

    gen = torch.Generator().manual_seed(5)
    size, dim, batch = 40, 6, 12
    theirs = PMLMemory(
        PMLContrastive(
            pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity(), reducer=SumReducer()
        ),
        dim,
        memory_size=size,
        miner=MultiSimilarityMiner(epsilon=MARGIN) if mining == "ms" else None,
    )
    loss_fn = build_loss("contrastive", mining=mining)
    ours = CrossBatchMemory(size=size)
    centres = F.normalize(torch.randn(4, dim, generator=gen, dtype=torch.float64), dim=1)
    for step in range(7):  # 84 items through 40 slots: the memory wraps around
        labels = torch.arange(4).repeat_interleave(3)
        noise = 0.7 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
        emb = F.normalize(centres[labels] + noise, dim=1)
        indices = torch.arange(step * batch, (step + 1) * batch)
        emb_ours = emb.clone().requires_grad_(True)
        emb_theirs = emb.clone().requires_grad_(True)
        ours.enqueue(emb_ours.detach(), labels, indices)
        got = ours.loss(loss_fn.from_sim, emb_ours, labels, indices) * batch
        expected = theirs(emb_theirs, labels)
        assert got.item() > 0
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-9, atol=1e-12)
        (grad_ours,) = torch.autograd.grad(got, emb_ours)
        (grad_theirs,) = torch.autograd.grad(expected, emb_theirs)
        tangent = grad_ours - (grad_ours * emb).sum(1, keepdim=True) * emb  # see the MS test
        torch.testing.assert_close(tangent, grad_theirs.to(grad_ours.dtype), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ["ms", "contrastive", "triplet", "binomial", "lifted"])
def test_every_pair_loss_scores_a_memory_like_a_naive_square_batch(name):
    """from_sim(sim (B, M), labels, ref_labels=, ignore=) of every registered pair loss equals
    its per-anchor losses on the square batch when the references are the batch itself."""
    from msl_kit.losses import build_loss

    gen = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(12, 5, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.arange(4).repeat_interleave(3)
    loss_fn = build_loss(name)
    square = loss_fn.from_sim(emb @ emb.T, labels)
    as_memory = loss_fn.from_sim(
        emb @ emb.T, labels, ref_labels=labels, ignore=torch.eye(12, dtype=torch.bool)
    )
    torch.testing.assert_close(as_memory, square)


def test_own_copy_is_not_a_positive():
    # Four near-identical embeddings of four classes: each anchor's only same-label entry is
    # its own stored copy. Ignored by index, no anchor has a positive and the term is 0; were
    # the copy counted, its similarity of 1 lies within the margin of the ~0.99 negatives and
    # would be mined, giving a positive loss.
    gen = torch.Generator().manual_seed(3)
    base = F.normalize(torch.randn(1, 8, generator=gen, dtype=torch.float64), dim=1)
    emb = F.normalize(base + 0.01 * torch.randn(4, 8, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.arange(4)
    indices = torch.tensor([10, 11, 12, 13])
    memory = CrossBatchMemory(size=16)
    memory.enqueue(emb, labels, indices)
    assert memory.loss(multi_similarity_loss, emb, labels, indices).item() == 0.0
    shifted = indices + 100  # the same pairs with the self-exclusion defeated
    leaked = memory.loss(multi_similarity_loss, emb, labels, shifted)
    assert leaked.item() > 0.1


def test_gradient_reaches_only_current_embeddings():
    gen = torch.Generator().manual_seed(4)
    memory = CrossBatchMemory(size=30)
    emb, labels, indices = random_batch(gen, 10, 4, 3, 1000)
    emb.requires_grad_(True)
    memory.enqueue(emb, labels, indices)  # not detached by the caller: enqueue must cut the graph
    assert not memory.embeddings.requires_grad and memory.embeddings.grad_fn is None
    (grad,) = torch.autograd.grad(memory.loss(multi_similarity_loss, emb, labels, indices), emb)
    ignore = indices[:, None] == indices[None, :]
    constant_refs = emb.detach().clone()
    anchors = emb.detach().clone().requires_grad_(True)
    expected = multi_similarity_loss(
        anchors @ constant_refs.T, labels, ref_labels=labels, ignore=ignore
    )
    (expected_grad,) = torch.autograd.grad(expected, anchors)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    # What a memory that kept the graph would give: the check above can tell them apart.
    through_refs = multi_similarity_loss(
        anchors @ anchors.T, labels, ref_labels=labels, ignore=ignore
    )
    (leaky_grad,) = torch.autograd.grad(through_refs, anchors)
    assert not torch.allclose(leaky_grad, grad)


def test_step_loss_waits_for_start_iteration_and_applies_weight():
    gen = torch.Generator().manual_seed(5)
    memory = CrossBatchMemory(size=50, start_iteration=3, weight=0.25)
    emb, labels, indices = random_batch(gen, 8, 4, 2, 100)
    batch_loss = multi_similarity_loss(emb @ emb.T, labels)
    assert (
        xbm_step_loss(memory, 2, batch_loss, multi_similarity_loss, emb, labels, indices)
        is batch_loss
    )
    assert len(memory) == 0 and not memory.active(2) and memory.active(3)
    total = xbm_step_loss(memory, 3, batch_loss, multi_similarity_loss, emb, labels, indices)
    assert len(memory) == 8
    term = memory.loss(multi_similarity_loss, emb, labels, indices)
    assert term.item() > 0
    torch.testing.assert_close(total, batch_loss + 0.25 * term)
    assert (
        xbm_step_loss(None, 10, batch_loss, multi_similarity_loss, emb, labels, indices)
        is batch_loss
    )


def test_empty_memory_term_is_a_differentiable_zero():
    emb = torch.randn(4, 3, requires_grad=True)
    term = CrossBatchMemory(size=8).loss(
        multi_similarity_loss, emb, torch.arange(4), torch.arange(4)
    )
    assert term.item() == 0.0
    term.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_width_change_is_an_error():
    memory = CrossBatchMemory(size=8)
    memory.enqueue(torch.randn(3, 4), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="4-d embeddings but got 5-d"):
        memory.enqueue(torch.randn(3, 5), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="one label and one dataset index"):
        memory.enqueue(torch.randn(3, 4), torch.arange(2), torch.arange(3))
    memory.reset()
    memory.enqueue(torch.randn(2, 5), torch.arange(2), torch.arange(2))  # any width after a reset
    assert len(memory) == 2


@pytest.mark.parametrize("batches", [[], [5], [6, 6, 6]])  # empty, partly filled, wrapped
def test_state_dict_round_trip(tmp_path, batches):
    gen = torch.Generator().manual_seed(6)
    memory = CrossBatchMemory(size=10, start_iteration=7, weight=0.5)
    for n in batches:
        memory.enqueue(*random_batch(gen, n, 3, 4, 50, dtype=torch.float32))
    path = tmp_path / "xbm.pt"
    torch.save({"xbm": memory.state_dict()}, path)
    restored = CrossBatchMemory(size=10)
    restored.load_state_dict(torch.load(path, weights_only=True)["xbm"])
    assert (len(restored), restored.ptr, restored.start_iteration, restored.weight) == (
        len(memory),
        memory.ptr,
        7,
        0.5,
    )
    # Resuming must continue identically: same contents after more enqueues.
    more = random_batch(gen, 4, 3, 4, 50, dtype=torch.float32)
    memory.enqueue(*more)
    restored.enqueue(*more)
    for a, b in zip(held(memory), held(restored)):
        assert torch.equal(a, b)
    emb, labels, indices = more
    torch.testing.assert_close(
        memory.loss(multi_similarity_loss, emb, labels, indices),
        restored.loss(multi_similarity_loss, emb, labels, indices),
    )
    with pytest.raises(ValueError, match="set the memory size to 10"):
        CrossBatchMemory(size=11).load_state_dict(memory.state_dict())


def test_batch_larger_than_memory_keeps_newest():
    memory = CrossBatchMemory(size=4)
    memory.enqueue(torch.arange(6.0).view(6, 1), torch.arange(6), torch.arange(6))
    emb, labels, indices = held(memory)
    assert sorted(emb.view(-1).tolist()) == [2.0, 3.0, 4.0, 5.0]
    assert sorted(indices.tolist()) == [2, 3, 4, 5]
    assert len(memory) == 4


def test_autocast_batches_are_stored_and_scored_in_float32():
    gen = torch.Generator().manual_seed(7)
    emb, labels, indices = random_batch(gen, 8, 4, 2, 100, dtype=torch.float32)
    memory = CrossBatchMemory(size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = (emb @ torch.eye(4)).requires_grad_(True)  # a bf16 activation, as a head would give
        assert half.dtype == torch.bfloat16
        memory.enqueue(half.detach(), labels, indices)
        term = memory.loss(multi_similarity_loss, half, labels, indices)
    assert memory.embeddings.dtype == torch.float32
    reference = memory.loss(multi_similarity_loss, half.detach().float(), labels, indices)
    torch.testing.assert_close(term, reference)  # same float32 maths, not a bf16 product
    term.backward()
    assert half.grad is not None and torch.isfinite(half.grad).all()
