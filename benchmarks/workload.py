"""The side-by-side workload without a framework: presets, data, model, training, evaluation, averaging.

The hand-written loop (handloop.py) and the Flower clients (flower_sim.py) share this module, so the two
do the very same arithmetic per step; it imports torch and nothing of fedevents, so neither process pays
for fedevents' imports. fedevents runs the same presets from its own config (bench_vs_loop.py writes it).
Data: synthetic 1x16x16 inputs of 10 classes (a few clusters per class in a small latent space, pushed
through a fixed random nonlinear map), each client's labels drawn from its own Dirichlet(0.5) mix, every
client with the same sample count; the server's held-out set has every class equally often.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Preset", "PRESETS", "QUICK", "client_data", "test_data", "build_model", "train", "evaluate",
           "average", "sample_clients", "shuffling"]

_LATENT, _MODES, _MAP = 16, 3, 64


@dataclass(frozen=True, slots=True)
class Preset:
    """One workload of the benchmark: how many clients, rounds, epochs and samples."""

    name: str
    clients: int
    per_round: int
    rounds: int
    epochs: int
    samples: int
    shape: tuple[int, ...] = (1, 16, 16)
    classes: int = 10
    alpha: float = 0.5
    hidden: int = 384
    lr: float = 0.05
    batch: int = 32
    test_size: int = 2000
    seed: int = 0

    @property
    def steps_per_training(self) -> int:
        """SGD steps of one client's local training."""
        return self.epochs * math.ceil(self.samples / self.batch)

    @property
    def steps(self) -> int:
        """SGD steps of the whole run."""
        return self.rounds * self.per_round * self.steps_per_training


PRESETS = {p.name: p for p in (
    Preset("small", clients=100, per_round=10, rounds=5, epochs=1, samples=64),
    Preset("wide", clients=1000, per_round=100, rounds=3, epochs=1, samples=64),
    Preset("heavy", clients=20, per_round=10, rounds=3, epochs=3, samples=8192),
)}
#: --quick: the same shapes, a fraction of the work, to check the suite end to end.
QUICK = {
    "small": replace(PRESETS["small"], clients=20, per_round=4, rounds=2),
    "wide": replace(PRESETS["wide"], clients=100, per_round=20, rounds=2),
    "heavy": replace(PRESETS["heavy"], clients=4, per_round=2, rounds=2, epochs=1, samples=1024),
}


@functools.lru_cache(maxsize=4)
def _world(preset: Preset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(preset.seed)
    features = math.prod(preset.shape)
    centres = 1.5 * torch.randn(preset.classes, _MODES, _LATENT, generator=gen)
    w1 = torch.randn(_LATENT, _MAP, generator=gen) / math.sqrt(_LATENT)
    b1 = 0.5 * torch.randn(_MAP, generator=gen)
    w2 = 3.0 * torch.randn(_MAP, features, generator=gen) / math.sqrt(_MAP)
    return centres, w1, b1, w2


def _render(preset: Preset, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    centres, w1, b1, w2 = _world(preset)
    modes = torch.randint(0, _MODES, (labels.numel(),), generator=gen)
    latent = centres[labels, modes] + torch.randn(labels.numel(), _LATENT, generator=gen)
    return (torch.tanh(latent @ w1 + b1) @ w2).reshape(labels.numel(), *preset.shape)


@functools.lru_cache(maxsize=256)
def client_data(preset: Preset, client: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``client``'s training samples: ``preset.samples`` of them, labels from its Dirichlet mix."""
    rng = random.Random(preset.seed * 1_000_003 + client)
    draws = [rng.gammavariate(preset.alpha, 1.0) for _ in range(preset.classes)]
    labels = torch.tensor(rng.choices(range(preset.classes), weights=draws, k=preset.samples))
    gen = torch.Generator().manual_seed(preset.seed * 1_000_003 + client)
    return _render(preset, labels, gen), labels


@functools.lru_cache(maxsize=4)
def test_data(preset: Preset) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's held-out set: ``preset.test_size`` samples, every class equally often."""
    labels = torch.arange(preset.test_size) % preset.classes
    return _render(preset, labels, torch.Generator().manual_seed(preset.seed - 1)), labels


def build_model(preset: Preset, seed: int | None = None) -> nn.Module:
    """The MLP 256-384-10 (inputs flattened): weights from ``seed``, torch's default ranges."""
    if seed is not None:
        torch.manual_seed(seed)
    features = math.prod(preset.shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, preset.hidden), nn.ReLU(),
                         nn.Linear(preset.hidden, preset.classes))


def train(model: nn.Module, preset: Preset, x: torch.Tensor, y: torch.Tensor, shuffle: torch.Generator) -> int:
    """Plain SGD (no momentum) over ``(x, y)`` for ``preset.epochs`` epochs; give the number of steps.

    The update is written out: it is torch.optim.SGD's arithmetic without momentum, and building a
    torch.optim optimizer would import torch._dynamo, which a loop this small does not need.
    """
    params = [p for p in model.parameters()]
    model.train()
    steps = 0
    for _ in range(preset.epochs):
        for batch in torch.randperm(y.numel(), generator=shuffle).split(preset.batch):
            for p in params:
                p.grad = None
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-preset.lr)
            steps += 1
    return steps


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` on ``(x, y)``, in batches of 1,024 as fedevents scores."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for xb, yb in zip(x.split(1024), y.split(1024)):
            correct += int((model(xb).argmax(1) == yb).sum())
    return correct / y.numel()


def average(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """FedAvg: the sample-weighted mean of the clients' state dicts."""
    total = float(sum(weights))
    return {key: sum(s[key] * (w / total) for s, w in zip(states, weights)) for key in states[0]}


def shuffling(preset: Preset, round_: int, client: int) -> torch.Generator:
    """The generator of ``client``'s batch order in round ``round_``."""
    return torch.Generator().manual_seed(preset.seed * 1_000_003 + round_ * 10_007 + client)


def sample_clients(preset: Preset, round_: int) -> list[int]:
    """The clients of round ``round_``: ``preset.per_round`` of them, drawn without replacement."""
    return sorted(random.Random(preset.seed * 7919 + round_).sample(range(preset.clients), preset.per_round))
