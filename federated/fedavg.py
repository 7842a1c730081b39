"""FedAvg: the server averages this round's client models, weighted by how many samples each trained on.

The server half holds the global state and an inbox of uploads per round; the client half loads a payload
into its model and packs its trained state for upload. Neither knows about threads beyond a lock, nor about
events.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Mapping, Sequence

import structlog
import torch
from torch import nn

__all__ = ["DISPATCH_STATES", "Upload", "AggregateResult", "FedAvgServer", "FedAvgClient", "weighted_mean"]

#: How a client joins a round: "integrated" (new to the server) or "incremental" (trained before).
DISPATCH_STATES = ("incremental", "integrated")

_log = structlog.get_logger("fedevents.federated")


@dataclass(frozen=True, slots=True)
class Upload:
    """A client's trained model state and the number of samples it trained on."""

    state: Mapping[str, torch.Tensor]
    samples: int


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
    return mean


class FedAvgServer:
    """The server half of FedAvg: global state, dispatch, an inbox per round and sample-weighted averaging."""

    def __init__(self, initial_state: Mapping[str, torch.Tensor]) -> None:
        self._state = dict(initial_state)
        self._inbox: dict[int, dict[str, Upload]] = {}
        self._lock = threading.Lock()

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The global model state; its tensors are replaced on aggregation, never changed in place."""
        with self._lock:
            return dict(self._state)

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the global state (a resumed run) and drop any pending uploads."""
        with self._lock:
            self._state = dict(state)
            self._inbox.clear()

    def dispatch(self, client: str, state: str) -> dict[str, torch.Tensor]:
        """Give the payload ``client`` starts its round from; for FedAvg the global state, whatever ``state``."""
        if state not in DISPATCH_STATES:
            raise ValueError(f"dispatch to {client!r}: expected state in {DISPATCH_STATES}, found {state!r}")
        # A shallow copy is enough: aggregation builds new tensors instead of writing into these.
        return self.state

    def receive(self, client: str, round: int, upload: Upload) -> None:
        """Put ``client``'s upload for ``round`` in the inbox (a second upload replaces the first)."""
        with self._lock:
            missing = self._state.keys() - upload.state.keys()
            if missing:
                raise ValueError(
                    f"round {round}: upload from {client!r} expected the global model's keys, "
                    f"found {sorted(missing)} missing"
                )
            self._inbox.setdefault(round, {})[client] = upload

    def pending(self, round: int) -> tuple[str, ...]:
        """Give the clients whose uploads for ``round`` wait in the inbox, by name."""
        with self._lock:
            return tuple(sorted(self._inbox.get(round, {})))

    def aggregate(self, round: int, clients: Sequence[str]) -> AggregateResult:
        """Replace the global state by the mean of ``round``'s uploads from ``clients``, then clear the inbox.

        Only uploads made for this round count, so a client that was offline never contributes a stale
        state. Listed clients without an upload are skipped (and logged); uploads for this or earlier rounds
        are dropped afterwards, uploads for later rounds are kept.
        """
        with self._lock:
            inbox = self._inbox.get(round, {})
            chosen = {name: inbox[name] for name in clients if name in inbox}
            absent = sorted(set(clients) - chosen.keys())
            if chosen:
                self._state = weighted_mean(chosen)
            for past in [r for r in self._inbox if r <= round]:
                del self._inbox[past]
        if absent:
            _log.warning("clients without an upload skipped", round=round, clients=absent)
        return AggregateResult(clients=tuple(sorted(chosen)), samples=sum(u.samples for u in chosen.values()))


class FedAvgClient:
    """The client half of FedAvg: start from the server's payload, hand back the trained state."""

    def receive(self, model: nn.Module, payload: Mapping[str, torch.Tensor]) -> None:
        """Load the payload into ``model``, whose previous weights FedAvg discards."""
        model.load_state_dict(payload)

    def upload(self, state: Mapping[str, torch.Tensor], samples: int) -> Upload:
        """Pack the trained ``state`` and its training samples for the server."""
        return Upload(state=state, samples=samples)
