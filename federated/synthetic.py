"""A synthetic classification task generated on the fly, so experiments need no downloads.

Each task name is one "world": class structure derived from ``(seed, task)``, shared by every client of that
task. A class is a few clusters (modes) in a small latent space, pushed through a fixed random nonlinear map
into the input space, so a model has to learn a nonlinear boundary rather than read the class off one
direction. Each client draws its own label proportions from ``Dirichlet(label_skew)`` and its own samples
from ``(seed, task, client)``; its held-out test split follows the same proportions.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .seeds import derive_seed, generator

__all__ = ["SyntheticSpec", "ClientData", "client_data", "global_test_data", "label_proportions"]

_LATENT = 16
_HIDDEN = 64
# Three clusters per class make each class a union of blobs: a linear model tops out near 0.77 accuracy on
# the default task, an MLP near 0.97, so learning shows over rounds instead of saturating at once.
_MODES = 3
# Spread of the cluster centres per latent axis, against noise=1.0 around each: clusters overlap at the edges
# but stay distinguishable.
_SEPARATION = 1.5
# Scales inputs to a spread of a few units, so plain SGD at lr 0.05 makes visible progress within rounds.
_INPUT_SCALE = 3.0
# Generated splits are cached for the clients that are active now; a few hundred bounds memory no matter
# how many clients an experiment names (regenerating costs milliseconds).
_CACHED_CLIENTS = 256
_CACHED_WORLDS = 32


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """The shape and difficulty of a synthetic task (``task_opts.synthetic`` in a config)."""

    num_classes: int
    input_shape: tuple[int, ...]
    samples_per_client: int
    label_skew: float
    test_size: int
    noise: float

    @classmethod
    def from_dict(cls, opts: Mapping[str, Any], *, where: str = "task_opts.synthetic") -> SyntheticSpec:
        """Build a spec from a config mapping, checking each value."""
        shape = opts.get("input_shape")
        if not isinstance(shape, (list, tuple)) or not shape or not all(_is_positive_int(d) for d in shape):
            raise ValueError(f"{where}.input_shape: expected a non-empty list of positive ints, found {shape!r}")
        return cls(
            num_classes=_positive_int(opts, "num_classes", where, minimum=2),
            input_shape=tuple(int(d) for d in shape),
            samples_per_client=_positive_int(opts, "samples_per_client", where, minimum=1),
            label_skew=_number(opts, "label_skew", where, positive=True),
            test_size=_positive_int(opts, "test_size", where, minimum=1),
            noise=_number(opts, "noise", where, positive=False),
        )


@dataclass(frozen=True, slots=True)
class ClientData:
    """One client's train and test splits for one task; treat the tensors as read-only (they are cached)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    proportions: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class _World:
    """The fixed class structure of one task: cluster centres and the nonlinear map to input space."""

    centres: torch.Tensor  # [classes, modes, latent]
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor

    def render(self, labels: torch.Tensor, gen: torch.Generator, spec: SyntheticSpec) -> torch.Tensor:
        count = labels.numel()
        modes = torch.randint(0, _MODES, (count,), generator=gen)
        latent = self.centres[labels, modes] + spec.noise * torch.randn(count, _LATENT, generator=gen)
        x = torch.tanh(latent @ self.w1 + self.b1) @ self.w2
        return x.reshape(count, *spec.input_shape)


def client_data(spec: SyntheticSpec, *, seed: int, task: str, client: str) -> ClientData:
    """Give ``client``'s splits of ``task``: identical for the same ``(seed, task, client, spec)``."""
    return _client_data(spec, seed, task, client)


def global_test_data(spec: SyntheticSpec, *, seed: int, task: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's held-out set of ``task``: ``size`` samples, every class equally likely, drawn apart from
    every client's data, so it scores the global model on the task rather than on any client's skew."""
    return _global_test_data(spec, seed, task, size)


@functools.lru_cache(maxsize=_CACHED_WORLDS)
def _global_test_data(spec: SyntheticSpec, seed: int, task: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(size) % spec.num_classes
    gen = generator(seed, task, "global-test")
    return _world(spec, seed, task).render(labels, gen, spec), labels


def label_proportions(spec: SyntheticSpec, *, seed: int, task: str, client: str) -> tuple[float, ...]:
    """Give the share of each class in ``client``'s data of ``task`` (a draw from Dirichlet(label_skew))."""
    return _proportions(random.Random(derive_seed(seed, task, client, "labels")), spec)


@functools.lru_cache(maxsize=_CACHED_CLIENTS)
def _client_data(spec: SyntheticSpec, seed: int, task: str, client: str) -> ClientData:
    world = _world(spec, seed, task)
    rng = random.Random(derive_seed(seed, task, client, "labels"))
    proportions = _proportions(rng, spec)
    classes = range(spec.num_classes)
    y_train = torch.tensor(rng.choices(classes, weights=proportions, k=spec.samples_per_client))
    y_test = torch.tensor(rng.choices(classes, weights=proportions, k=spec.test_size))
    gen = generator(seed, task, client, "samples")
    x_train = world.render(y_train, gen, spec)
    x_test = world.render(y_test, gen, spec)
    return ClientData(x_train, y_train, x_test, y_test, proportions)


@functools.lru_cache(maxsize=_CACHED_WORLDS)
def _world(spec: SyntheticSpec, seed: int, task: str) -> _World:
    gen = generator(seed, task, "world")
    features = math.prod(spec.input_shape)
    return _World(
        centres=_SEPARATION * torch.randn(spec.num_classes, _MODES, _LATENT, generator=gen),
        w1=torch.randn(_LATENT, _HIDDEN, generator=gen) / math.sqrt(_LATENT),
        b1=0.5 * torch.randn(_HIDDEN, generator=gen),
        w2=_INPUT_SCALE * torch.randn(_HIDDEN, features, generator=gen) / math.sqrt(_HIDDEN),
    )


def _proportions(rng: random.Random, spec: SyntheticSpec) -> tuple[float, ...]:
    draws = [rng.gammavariate(spec.label_skew, 1.0) for _ in range(spec.num_classes)]
    total = sum(draws)
    if total <= 0.0:
        # With a tiny alpha every gamma draw can underflow to 0; the Dirichlet limit is then one class.
        draws = [0.0] * spec.num_classes
        draws[rng.randrange(spec.num_classes)] = total = 1.0
    return tuple(d / total for d in draws)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_int(opts: Mapping[str, Any], key: str, where: str, *, minimum: int) -> int:
    value = opts.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}.{key}: expected an int >= {minimum}, found {value!r}")
    return value


def _number(opts: Mapping[str, Any], key: str, where: str, *, positive: bool) -> float:
    value = opts.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{where}.{key}: expected a number {'> 0' if positive else '>= 0'}, found {value!r}")
    return float(value)
