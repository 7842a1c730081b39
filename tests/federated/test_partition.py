"""Partitioners: disjoint, reproducible from the seed, and with the statistics each one promises."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedevents.federated.partition import dirichlet, iid, matching, natural, partition, quantity, shards

LABELS = [i % 10 for i in range(1000)]  # 10 classes of 100


def _check_disjoint(parts: list[list[int]], total: int) -> None:
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) and all(0 <= i < total for i in flat)
    assert all(p == sorted(p) for p in parts)


def _top_share(parts: list[list[int]], labels: list[int]) -> float:
    """Mean over clients of the share of the client's most common class."""
    return float(np.mean([Counter(labels[i] for i in p).most_common(1)[0][1] / len(p) for p in parts if p]))


@pytest.mark.parametrize("name, options", [
    ("iid", {}), ("dirichlet", {"alpha": 0.5}), ("shards", {"shards_per_client": 2}), ("quantity", {"sigma": 1.0}),
])
def test_same_seed_same_split_other_seed_other_split(name: str, options: dict) -> None:
    first = partition(name, LABELS, 10, 7, options)
    assert first == partition(name, LABELS, 10, 7, options)
    assert first != partition(name, LABELS, 10, 8, options)
    _check_disjoint(first, len(LABELS))


def test_iid_gives_near_equal_sizes_and_every_sample() -> None:
    parts = iid(LABELS[:103], 10, 0)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    assert sorted(i for p in parts for i in p) == list(range(103))
    # Shuffled, so each client sees most classes rather than a run of one.
    assert _top_share(iid(LABELS, 10, 0), LABELS) < 0.3


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skewed, mild = dirichlet(LABELS, 20, 1, alpha=0.05), dirichlet(LABELS, 20, 1, alpha=100.0)
    for parts in (skewed, mild):
        assert sorted(i for p in parts for i in p) == list(range(1000))
    assert _top_share(skewed, LABELS) > 0.6
    assert _top_share(mild, LABELS) < 0.25


def test_dirichlet_redraws_until_every_client_has_min_size() -> None:
    parts = dirichlet(LABELS, 20, 3, alpha=0.1, min_size=10)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_that_cannot_meet_min_size_says_so() -> None:
    with pytest.raises(ValueError, match=r"dirichlet: expected every client to get at least min_size = 60 samples, "
                                         r"found no such draw in 100 tries with alpha = 0.1 over 20 clients"):
        dirichlet(LABELS, 20, 3, alpha=0.1, min_size=60)


def test_shards_give_each_client_k_classes_and_equal_sizes() -> None:
    parts = shards(LABELS, 20, 4, shards_per_client=2)  # 40 shards of 25: none straddles two classes
    assert [len(p) for p in parts] == [50] * 20
    assert max(len({LABELS[i] for i in p}) for p in parts) == 2
    assert sorted(i for p in parts for i in p) == list(range(1000))


def test_shards_leave_out_the_remainder_only() -> None:
    parts = shards(LABELS[:1003] + [0, 1, 2], 10, 0, shards_per_client=3)
    assert sum(len(p) for p in parts) == 30 * (1003 // 30)


def test_quantity_sizes_add_up_and_spread_with_sigma() -> None:
    wide, narrow = quantity(LABELS, 20, 2, sigma=2.0), quantity(LABELS, 20, 2, sigma=0.01)
    for parts in (wide, narrow):
        assert sum(len(p) for p in parts) == 1000 and min(len(p) for p in parts) >= 1
        _check_disjoint(parts, 1000)
    assert np.std([len(p) for p in wide]) / 50 > 0.8
    assert max(len(p) for p in narrow) - min(len(p) for p in narrow) <= 2


def test_natural_never_splits_a_writer_and_deals_writers_evenly() -> None:
    writers = [f"w{i % 13}" for i in range(260)]
    parts = natural(writers, 5, 0)
    owners = {}
    for client, part in enumerate(parts):
        for i in part:
            assert owners.setdefault(writers[i], client) == client
    assert sorted(Counter(owners.values()).values()) == [2, 2, 3, 3, 3]
    assert sorted(i for p in parts for i in p) == list(range(260))
    assert parts == natural(writers, 5, 0) and parts != natural(writers, 5, 1)


def test_natural_needs_a_writer_per_client() -> None:
    with pytest.raises(ValueError, match=r"natural: expected at least as many writers as clients \(4\), found 3"):
        natural(["a", "b", "c", "a"], 4, 0)


def test_matching_gives_each_client_its_own_class_mix() -> None:
    train = dirichlet(LABELS, 5, 0, alpha=0.1)
    test_labels = [i % 10 for i in range(500)]
    held = matching(LABELS, train, test_labels, 0)
    _check_disjoint(held, 500)
    for mine, theirs in zip(train, held):
        train_mix = np.bincount([LABELS[i] for i in mine], minlength=10) / max(len(mine), 1)
        test_mix = np.bincount([test_labels[i] for i in theirs], minlength=10) / max(len(theirs), 1)
        assert np.abs(train_mix - test_mix).max() < 0.05


@pytest.mark.parametrize("name, options, message", [
    ("zipf", {}, "partition.name: expected one of iid, dirichlet, shards, quantity, natural, found 'zipf'"),
    ("dirichlet", {}, "partition.alpha: expected a value for partitioner 'dirichlet', found none"),
    ("dirichlet", {"alpha": 0}, "partition.alpha: expected a number > 0, found 0"),
    ("shards", {"k": 2}, "partition.k: expected one of the options of 'shards' \\(shards_per_client\\), found 'k'"),
    ("iid", {"alpha": 1}, "partition.alpha: expected one of the options of 'iid' \\(none\\), found 'alpha'"),
    ("natural", {}, "partition.name: expected a data set that records writers for 'natural', found none"),
])
def test_bad_options_are_one_line_errors(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        partition(name, LABELS, 10, 0, options)


def test_more_clients_than_samples_is_refused() -> None:
    with pytest.raises(ValueError, match=r"partition: expected at least one sample per client \(10\), found 4 samples"):
        iid([0, 1, 0, 1], 10, 0)
    with pytest.raises(ValueError, match=r"per shard \(num_clients \* shards_per_client\) \(12\), found 10 samples"):
        shards(LABELS[:10], 4, 0, shards_per_client=3)
