"""PKSampler: batch composition, seeding, resume offset, DDP split and its errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from msl_kit.sampler import PKSampler, RandomBatchSampler


def _labels(sizes: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batches_hold_p_distinct_classes_with_k_each(seed):
    rng = np.random.default_rng(seed)
    labels = _labels(list(rng.integers(5, 30, size=25)))
    sampler = PKSampler(labels, batch_size=40, samples_per_class=5, seed=seed, iterations=50)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50
    for batch in batches:
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 8 and set(counts.values()) == {5}
        assert len(set(batch)) == len(batch), "an index repeated in a batch of a class large enough"


def test_small_classes_are_padded_with_replacement_only_there():
    labels = _labels([2, 1, 10, 10])
    for batch in PKSampler(labels, batch_size=16, samples_per_class=4, seed=0, iterations=30):
        by_class = {}
        for i in batch:
            by_class.setdefault(int(labels[i]), []).append(i)
        assert sorted(len(v) for v in by_class.values()) == [4, 4, 4, 4]
        assert set(by_class[0]) == {0, 1} and set(by_class[1]) == {2}
        for c in (2, 3):
            assert len(set(by_class[c])) == 4


def test_same_seed_same_stream_other_seed_other_stream():
    labels = _labels([12] * 20)
    a = list(PKSampler(labels, 20, 4, seed=3, iterations=20))
    b = list(PKSampler(labels, 20, 4, seed=3, iterations=20))
    c = list(PKSampler(labels, 20, 4, seed=4, iterations=20))
    assert a == b and a != c


def test_start_skips_exactly_the_batches_already_done():
    labels = _labels([7] * 15)
    full = list(PKSampler(labels, 15, 3, seed=1, iterations=40))
    resumed = PKSampler(labels, 15, 3, seed=1, iterations=40, start=17)
    assert len(resumed) == 23 and list(resumed) == full[17:]


def test_classes_and_items_are_visited_evenly():
    labels = _labels([10] * 12)
    sampler = PKSampler(labels, 12, 2, seed=0, iterations=120)  # 6 classes x 2 per batch
    class_counts = Counter(
        int(labels[b[0]]) for batch in sampler for b in [batch[i : i + 2] for i in range(0, 12, 2)]
    )
    assert set(class_counts.values()) == {60}, "each round uses every class once"
    item_counts = Counter(i for batch in sampler for i in batch)
    assert max(item_counts.values()) - min(item_counts.values()) <= 1


def test_epoch_style_length():
    labels = _labels([5] * 30)
    sampler = PKSampler(labels, 20, 5, seed=0)
    assert len(sampler) == 30 // 4 == len(list(sampler))


def test_ranks_split_the_global_batch_without_overlap():
    labels = _labels([9] * 16)
    single = list(PKSampler(labels, 32, 4, seed=5, iterations=10))
    rank0 = list(PKSampler(labels, 32, 4, seed=5, iterations=10, num_replicas=2, rank=0))
    rank1 = list(PKSampler(labels, 32, 4, seed=5, iterations=10, num_replicas=2, rank=1))
    for whole, a, b in zip(single, rank0, rank1):
        assert a + b == whole
        assert not set(labels[a]) & set(labels[b])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=30, samples_per_class=4), "not a multiple"),
        (dict(batch_size=60, samples_per_class=5), "only 6"),
        (dict(batch_size=20, samples_per_class=5, num_replicas=3), "split evenly"),
    ],
)
def test_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PKSampler(_labels([5] * 6), **kwargs)


def test_non_integer_labels_are_refused():
    with pytest.raises(TypeError, match="integers"):
        PKSampler(np.array(["a", "b", "a", "b"]), 4, 2)
    with pytest.raises(TypeError, match="integers"):
        PKSampler(np.array([0.0, 1.0, 0.0, 1.0]), 4, 2)


# --- class_draw -----------------------------------------------------------------------------

UNEVEN = [5, 10, 15, 20, 25, 30, 3, 12] * 3  # 24 classes; floor(n / 5) = 1..6, and 3 < K


def _class_counts(labels: np.ndarray, sampler: PKSampler, k: int) -> np.ndarray:
    counts = Counter(int(labels[b[i]]) for b in sampler for i in range(0, len(b), k))
    return np.array([counts[c] for c in range(int(labels.max()) + 1)])


def test_released_draws_classes_in_proportion_to_their_chunks():
    labels = _labels(UNEVEN)
    sampler = PKSampler(labels, 10, 5, seed=0, iterations=3000, class_draw="released")
    observed = _class_counts(labels, sampler, 5)
    chunks = np.array([max(n // 5, 1) for n in UNEVEN])
    expected = chunks / chunks.sum() * observed.sum()
    # epoch ends drop a few chunks of the largest classes, as in the released code
    assert np.all(np.abs(observed / expected - 1) < 0.1), observed / expected


def test_uniform_draws_every_class_equally_whatever_its_size():
    labels = _labels(UNEVEN)
    observed = _class_counts(labels, PKSampler(labels, 10, 5, seed=0, iterations=1200), 5)
    assert observed.max() - observed.min() <= 1  # shuffled rounds: 2400 draws / 24 classes


@pytest.mark.parametrize("seed", [0, 1])
def test_released_batches_hold_p_distinct_classes_with_k_each(seed):
    labels = _labels(UNEVEN)
    sampler = PKSampler(labels, 20, 5, seed=seed, iterations=200, class_draw="released")
    for batch in sampler:
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {5}
        for c in counts:
            members = [i for i in batch if labels[i] == c]
            if UNEVEN[c] >= 5:
                assert len(set(members)) == 5, "a chunk never repeats an index"
            else:
                assert set(members) == set(np.flatnonzero(labels == c).tolist())
    assert len(sampler) == 200


def test_released_epoch_drops_leftovers_and_counts_its_batches():
    labels = _labels([7, 7, 7, 7])  # 1 chunk of 5 per class, 2 leftovers each, 2 batches
    sampler = PKSampler(labels, 10, 5, seed=3, class_draw="released")
    batches = list(sampler)
    assert len(sampler) == len(batches) == 2
    assert sorted(c for b in batches for c in set(labels[b].tolist())) == [0, 1, 2, 3]


def test_released_start_and_ranks_follow_the_same_stream():
    labels = _labels(UNEVEN)
    kw = dict(seed=5, iterations=30, class_draw="released")
    full = list(PKSampler(labels, 20, 5, **kw))
    assert list(PKSampler(labels, 20, 5, start=11, **kw)) == full[11:]
    rank0 = list(PKSampler(labels, 20, 5, num_replicas=2, rank=0, **kw))
    rank1 = list(PKSampler(labels, 20, 5, num_replicas=2, rank=1, **kw))
    for whole, a, b in zip(full, rank0, rank1):
        assert a + b == whole and not set(labels[a]) & set(labels[b])
    assert full != list(PKSampler(labels, 20, 5, **{**kw, "seed": 6}))


def test_unknown_class_draw_is_refused():
    with pytest.raises(ValueError, match="uniform.*released"):
        PKSampler(_labels([5] * 6), 10, 5, class_draw="proportional")


def test_random_sampler_shuffles_epochs_drops_the_rest_and_resumes():
    sampler = RandomBatchSampler(23, 5, seed=3, iterations=9)
    batches = list(sampler)
    assert len(batches) == 9 and all(len(b) == 5 for b in batches)
    for epoch in (batches[:4], batches[4:8]):  # 23 // 5 = 4 batches an epoch, 3 items dropped
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 20 and set(flat) <= set(range(23))
    assert batches[:4] != batches[4:8], "each epoch reshuffles"
    assert list(RandomBatchSampler(23, 5, seed=3, iterations=9, start=6)) == batches[6:]
    ranks = [
        list(RandomBatchSampler(23, 6, 3, iterations=2, num_replicas=2, rank=r)) for r in (0, 1)
    ]
    whole = list(RandomBatchSampler(23, 6, 3, iterations=2))
    assert [a + b for a, b in zip(*ranks)] == whole, "DDP ranks split the global batch"
    with pytest.raises(ValueError, match="lower train.batch_size"):
        RandomBatchSampler(4, 5)
