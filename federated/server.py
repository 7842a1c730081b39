"""The server's bookkeeping around a method: its state, an inbox of uploads per round, and a lock."""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import structlog
import torch

from .fedavg import DISPATCH_STATES, AggregateResult, Upload
from .methods import FedAvg, Method, ServerState

__all__ = ["Server", "FedAvgServer"]

_log = structlog.get_logger("fedevents.federated")


class Server:
    """Hands out payloads and combines one round's uploads with ``method``; safe across worker threads."""

    def __init__(self, initial_state: Mapping[str, torch.Tensor], method: Method) -> None:
        self.method = method
        self._state = ServerState(dict(initial_state))
        self._inbox: dict[int, dict[str, Upload]] = {}
        self._lock = threading.Lock()

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The global model state; its tensors are replaced on aggregation, never changed in place."""
        with self._lock:
            return dict(self._state.model)

    def state_dict(self) -> dict[str, Any]:
        """The global model and the method's server extras, for a checkpoint (no upload is pending then)."""
        with self._lock:
            return {"model": dict(self._state.model), "extras": dict(self._state.extras)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()`` (a resumed run); pending uploads are dropped."""
        with self._lock:
            self._state = ServerState(dict(state["model"]), dict(state.get("extras", {})))
            self._inbox.clear()

    def dispatch(self, client: str, state: str) -> dict[str, Any]:
        """The payload ``client`` starts its round from; ``state`` is how it joins ("integrated" if new)."""
        if state not in DISPATCH_STATES:
            raise ValueError(f"dispatch to {client!r}: expected state in {DISPATCH_STATES}, found {state!r}")
        with self._lock:
            return self.method.payload(self._state, client, state)

    def receive(self, client: str, round: int, upload: Upload) -> None:
        """Put ``client``'s upload for ``round`` in the inbox (a second upload replaces the first)."""
        with self._lock:
            missing = self._state.model.keys() - upload.state.keys() if upload.state else set()
            if missing:
                raise ValueError(
                    f"round {round}: upload from {client!r} expected the global model's keys, "
                    f"found {sorted(missing)} missing"
                )
            self._inbox.setdefault(round, {})[client] = upload

    def pending(self, round: int) -> tuple[str, ...]:
        """The clients whose uploads for ``round`` wait in the inbox, by name."""
        with self._lock:
            return tuple(sorted(self._inbox.get(round, {})))

    def aggregate(self, round: int, clients: Sequence[str]) -> AggregateResult:
        """Combine ``round``'s uploads from ``clients`` with the method, then clear the inbox.

        Only uploads made for this round count, so a client that was offline never contributes a stale
        state. Listed clients without an upload are skipped (and logged); uploads for this or earlier rounds
        are dropped afterwards, uploads for later rounds are kept.
        """
        with self._lock:
            inbox = self._inbox.get(round, {})
            chosen = {name: inbox[name] for name in clients if name in inbox}
            absent = sorted(set(clients) - chosen.keys())
            if chosen:
                handed = ServerState(self._state.model, self._state.extras, round=round)
                self._state = self.method.aggregate(handed, chosen)
            for past in [r for r in self._inbox if r <= round]:
                del self._inbox[past]
        if absent:
            _log.warning("clients without an upload skipped", round=round, clients=absent)
        return AggregateResult(clients=tuple(sorted(chosen)), samples=sum(u.samples for u in chosen.values()))


class FedAvgServer(Server):
    """The server half of FedAvg: sample-weighted averaging of this round's uploads."""

    def __init__(self, initial_state: Mapping[str, torch.Tensor]) -> None:
        super().__init__(initial_state, FedAvg())
