"""FedAvg: the server averages this round's client models, weighted by how many samples each trained on.

The server half holds the global state and an inbox of uploads per round; the client half loads a payload
into its model and packs its trained state for upload. Neither knows about threads beyond a lock, nor about
events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import structlog
import torch
from torch import nn

from .sharing import bitwise_equal

__all__ = ["DISPATCH_STATES", "Upload", "AggregateResult", "FedAvgClient", "weighted_mean"]

#: How a client joins a round: "integrated" (new to the server) or "incremental" (trained before).
DISPATCH_STATES = ("incremental", "integrated")

_log = structlog.get_logger("fedevents.federated")


@dataclass(frozen=True, slots=True)
class Upload:
    """A client's trained model state, the number of samples it trained on, and what else its method sends.

    ``extras`` holds a method's per-client values beside the model (FedCurv's Fisher diagonal ``u`` and
    ``v = u * w``); FedAvg sends none.
    """

    state: Mapping[str, torch.Tensor]
    samples: int
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AggregateResult:
    """Which clients' uploads went into the new global model, and their total samples."""

    clients: tuple[str, ...]
    samples: int


def weighted_mean(uploads: Mapping[str, Upload]) -> dict[str, torch.Tensor]:
    """Average the uploads' states, each weighted by its samples.

    Clients are summed in name order and in float64, so the result does not depend on upload order. Integer
    tensors (e.g. BatchNorm's num_batches_tracked) are counters, not weights: a mean of counts is meaningless,
    so they are taken from the upload with the most samples (the first by name among equals).
    """
    if not uploads:
        raise ValueError("weighted_mean: expected at least one upload, found none")
    names = sorted(uploads)
    total = sum(uploads[name].samples for name in names)
    if total <= 0:
        raise ValueError(f"weighted_mean: expected uploads with samples > 0, found {total} in all")
    largest = max(names, key=lambda name: uploads[name].samples)  # max keeps the first by name among equals
    mean: dict[str, torch.Tensor] = {}
    for key, reference in uploads[largest].state.items():
        if not (reference.is_floating_point() or reference.is_complex()):
            mean[key] = reference
            continue
        acc = torch.zeros(reference.shape, dtype=torch.float64, device=reference.device)
        for name in names:
            acc.add_(uploads[name].state[key].to(torch.float64), alpha=uploads[name].samples)
        mean[key] = (acc / total).to(reference.dtype)
        if all(uploads[name].state[key] is reference for name in names) and bitwise_equal(mean[key], reference):
            # Every client sent the one tensor (a frozen weight they all share): the mean keeps sharing it.
            mean[key] = reference
    return mean


class FedAvgClient:
    """The client half of FedAvg: start from the server's payload, hand back the trained state."""

    def receive(self, model: nn.Module, payload: Mapping[str, torch.Tensor]) -> None:
        """Load the payload into ``model``, whose previous weights FedAvg discards."""
        model.load_state_dict(payload)

    def upload(self, state: Mapping[str, torch.Tensor], samples: int) -> Upload:
        """Pack the trained ``state`` and its training samples for the server."""
        return Upload(state=state, samples=samples)
