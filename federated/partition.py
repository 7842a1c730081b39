"""Partitioners: which samples of a data set each client holds, fixed by the seed.

A partitioner maps ``(labels or writers, num_clients, seed, options)`` to one index list per client. Every
sample goes to at most one client, each list is sorted, and the same arguments give the same lists on every
machine (the draws come from ``derive_seed``). ``matching`` then splits a test set so that each client's
held-out share has the class mix of its training share.

- ``iid``: a shuffle cut into near-equal parts (sizes differ by at most one).
- ``dirichlet``: label skew; each class is split over the clients in proportions drawn from
  ``Dirichlet(alpha)``. Small ``alpha`` (0.1) gives each client a few dominant classes, large (100) is near IID.
  ``min_size`` redraws (up to 100 times) until every client holds at least that many samples.
- ``shards``: the pathological split of McMahan et al.; samples sorted by label are cut into
  ``num_clients * shards_per_client`` equal shards and each client gets ``shards_per_client`` of them, so it
  sees at most that many classes when class sizes are multiples of the shard size.
- ``quantity``: quantity skew; client sizes proportional to log-normal draws ``exp(N(0, sigma))``, each
  client at least one sample, labels IID within a client.
- ``natural``: by writer (FEMNIST); the distinct writers, shuffled, are dealt to the clients in turn, so
  each client holds every sample of its writers and no writer is split.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .seeds import derive_seed

__all__ = ["PARTITIONERS", "partition", "matching", "iid", "dirichlet", "shards", "quantity", "natural"]

Partition = list[list[int]]


def iid(labels: Sequence[int], num_clients: int, seed: int) -> Partition:
    """Shuffle every sample and cut the order into ``num_clients`` parts of near-equal size."""
    _check_clients(num_clients, len(labels))
    order = _rng(seed, "iid").permutation(len(labels))
    return _sorted_parts(np.array_split(order, num_clients))


def dirichlet(labels: Sequence[int], num_clients: int, seed: int, *, alpha: float, min_size: int = 1) -> Partition:
    """Split each class over the clients in proportions drawn from ``Dirichlet(alpha)`` (label skew)."""
    _check_clients(num_clients, len(labels))
    labels = np.asarray(labels)
    for attempt in range(100):
        parts = _dirichlet_once(labels, num_clients, seed, alpha, attempt)
        if min(len(p) for p in parts) >= min_size:
            return _sorted_parts(parts)
    raise ValueError(f"dirichlet: expected every client to get at least min_size = {min_size} samples, found no "
                     f"such draw in 100 tries with alpha = {alpha} over {num_clients} clients; lower min_size")


def _dirichlet_once(labels: np.ndarray, num_clients: int, seed: int, alpha: float, attempt: int) -> Partition:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        shares = _rng(seed, "dirichlet", attempt, int(label)).dirichlet(np.full(num_clients, alpha))
        members = _rng(seed, "dirichlet order", int(label)).permutation(np.flatnonzero(labels == label))
        cuts = np.rint(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client] += chunk.tolist()
    return parts


def shards(labels: Sequence[int], num_clients: int, seed: int, *, shards_per_client: int = 2) -> Partition:
    """Sort by label, cut into ``num_clients * shards_per_client`` equal shards, give each client that many."""
    count = num_clients * shards_per_client
    _check_clients(count, len(labels), what="shard (num_clients * shards_per_client)")
    labels = np.asarray(labels)
    shuffled = _rng(seed, "shards order").permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    size = len(labels) // count  # the remainder (fewer than `count` samples) is left out, as in the original split
    pieces = [by_label[i * size:(i + 1) * size] for i in range(count)]
    deal = _rng(seed, "shards deal").permutation(count)
    return _sorted_parts([np.concatenate([pieces[s] for s in deal[c::num_clients]]) for c in range(num_clients)])


def quantity(labels: Sequence[int], num_clients: int, seed: int, *, sigma: float = 1.0) -> Partition:
    """Give clients sizes proportional to log-normal draws ``exp(N(0, sigma))``, at least one sample each."""
    total = len(labels)
    _check_clients(num_clients, total)
    weights = _rng(seed, "quantity sizes").lognormal(0.0, sigma, num_clients)
    sizes = 1 + np.floor(weights / weights.sum() * (total - num_clients)).astype(int)
    # Hand the samples lost to rounding down to the largest clients, one each, so sizes add up to `total`.
    sizes[np.argsort(-weights, kind="stable")[: total - sizes.sum()]] += 1
    order = _rng(seed, "quantity order").permutation(total)
    return _sorted_parts(np.split(order, np.cumsum(sizes)[:-1]))


def natural(writers: Sequence[str], num_clients: int, seed: int) -> Partition:
    """Deal the distinct writers, shuffled, to the clients in turn; a client holds all samples of its writers."""
    names = sorted(set(writers))
    if len(names) < num_clients:
        raise ValueError(f"natural: expected at least as many writers as clients ({num_clients}), found {len(names)}")
    dealt = [names[i] for i in _rng(seed, "natural").permutation(len(names))]
    owner = {name: i % num_clients for i, name in enumerate(dealt)}
    parts: Partition = [[] for _ in range(num_clients)]
    for index, writer in enumerate(writers):
        parts[owner[writer]].append(index)
    return parts


def matching(train_labels: Sequence[int], train_parts: Partition, labels: Sequence[int], seed: int) -> Partition:
    """Split another set (a test set) like ``train_parts``: each class in proportion to the clients' training counts.

    A class no client trained on goes to nobody; a client's held-out share thus follows its own label mix.
    """
    train_labels, labels = np.asarray(train_labels), np.asarray(labels)
    parts: Partition = [[] for _ in train_parts]
    for label in np.unique(labels):
        counts = np.array([np.count_nonzero(train_labels[p] == label) for p in train_parts], dtype=float)
        if counts.sum() == 0:
            continue
        members = _rng(seed, "matching", int(label)).permutation(np.flatnonzero(labels == label))
        cuts = np.rint(np.cumsum(counts / counts.sum())[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client] += chunk.tolist()
    return _sorted_parts(parts)


PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "iid": iid, "dirichlet": dirichlet, "shards": shards, "quantity": quantity, "natural": natural,
}
_OPTIONS: dict[str, dict[str, type]] = {
    "iid": {}, "dirichlet": {"alpha": float, "min_size": int}, "shards": {"shards_per_client": int},
    "quantity": {"sigma": float}, "natural": {},
}
_REQUIRED = {"dirichlet": ("alpha",)}


def partition(
    name: str, labels: Sequence[int], num_clients: int, seed: int, options: Mapping[str, Any] | None = None,
    *, writers: Sequence[str] | None = None, where: str = "partition",
) -> Partition:
    """Run the partitioner ``name`` with ``options``, checking them first; ``natural`` reads ``writers``."""
    if name not in PARTITIONERS:
        raise ValueError(f"{where}.name: expected one of {', '.join(PARTITIONERS)}, found {name!r}")
    kwargs = _checked_options(name, dict(options or {}), where)
    if name == "natural":
        if writers is None:
            raise ValueError(f"{where}.name: expected a data set that records writers for 'natural', found none")
        return natural(writers, num_clients, seed)
    return PARTITIONERS[name](labels, num_clients, seed, **kwargs)


def _checked_options(name: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    allowed = _OPTIONS[name]
    for key, value in options.items():
        if key not in allowed:
            raise ValueError(f"{where}.{key}: expected one of the options of {name!r} "
                             f"({', '.join(allowed) or 'none'}), found {key!r}")
        if not _positive(value, allowed[key], zero_ok=key == "min_size"):
            raise ValueError(f"{where}.{key}: expected a {'number > 0' if allowed[key] is float else 'positive int'}, "
                             f"found {value!r}")
    for key in _REQUIRED.get(name, ()):
        if key not in options:
            raise ValueError(f"{where}.{key}: expected a value for partitioner {name!r}, found none")
    return options


def _positive(value: Any, kind: type, *, zero_ok: bool) -> bool:
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int) and (value >= 0 if zero_ok else value > 0)
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_clients(num_clients: int, samples: int, *, what: str | None = None) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients: expected an int >= 1, found {num_clients!r}")
    if samples < num_clients:
        raise ValueError(f"partition: expected at least one sample per {what or 'client'} ({num_clients}), "
                         f"found {samples} samples")


def _rng(seed: int, *parts: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, "partition", *parts))


def _sorted_parts(parts: Sequence[Any]) -> Partition:
    return [sorted(int(i) for i in part) for part in parts]
