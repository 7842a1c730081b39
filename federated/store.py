"""Per-client training state that exists only for clients that have trained, bounded in memory.

Clients are just names. A client's state (model, optimizer and scheduler state, counters) is created the
first time it trains; an experiment can therefore name 100,000 clients and pay for the few that run. At most
``max_in_memory`` states stay in memory (least recently used go first); older ones are spilled to files.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import torch

__all__ = ["ClientState", "ClientStore", "state_nbytes"]


@dataclass(frozen=True, slots=True)
class ClientState:
    """What one client keeps between rounds; tensors live on the CPU and are never changed in place."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    rounds_trained: int
    samples: int
    #: The method's state for this client (importances, anchors, exemplars, …); tensors on the CPU.
    memory: dict[str, Any] = field(default_factory=dict)
    #: The task of the client's last round.
    task: str | None = None


class ClientStore:
    """A thread-safe map from client name to ``ClientState`` that spills least recently used states to disk."""

    def __init__(self, *, max_in_memory: int = 256, spill_dir: str | os.PathLike[str] | None = None) -> None:
        if isinstance(max_in_memory, bool) or not isinstance(max_in_memory, int) or max_in_memory < 1:
            raise ValueError(f"ClientStore: max_in_memory expected an int >= 1, found {max_in_memory!r}")
        self._max_in_memory = max_in_memory
        self._spill_dir = None if spill_dir is None else Path(spill_dir)
        self._memory: OrderedDict[str, ClientState] = OrderedDict()
        self._nbytes: dict[str, int] = {}
        self._spilled: set[str] = set()
        # Grows with every state stored, so a checkpoint can tell which clients changed since the last one.
        self._generation: dict[str, int] = {}
        self._counter = itertools.count(1)
        # Disk I/O happens under the lock too: states are small and it keeps a state in exactly one place.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._memory) + len(self._spilled)

    def __contains__(self, client: object) -> bool:
        with self._lock:
            return client in self._memory or client in self._spilled

    def known(self, client: str) -> bool:
        """Tell whether ``client`` has a stored state, that is, whether it has ever trained."""
        return client in self

    def nbytes_in_memory(self) -> int:
        """Give the bytes held by the tensors of the states kept in memory."""
        with self._lock:
            return sum(self._nbytes.values())

    def get(self, client: str) -> ClientState | None:
        """Give ``client``'s state (loading it back from disk if it was spilled), or None if it never trained."""
        with self._lock:
            state = self._memory.get(client)
            if state is not None:
                self._memory.move_to_end(client)
                return state
            if client not in self._spilled:
                return None
            state = self._load(client)
            self._keep(client, state)
            return state

    def put(self, client: str, state: ClientState) -> None:
        """Store ``state`` as ``client``'s latest state."""
        with self._lock:
            self._generation[client] = next(self._counter)
            if client in self._spilled:
                self._spilled.discard(client)
                self._path(client).unlink(missing_ok=True)
            self._keep(client, state)

    def generations(self) -> dict[str, int]:
        """Each stored client's generation: a number that changes whenever ``put`` stores a new state for it."""
        with self._lock:
            return dict(self._generation)

    def export(self, clients: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """The stored states (of ``clients`` only, if given) as plain dicts by client name; spilled ones are
        read back and left on disk."""
        with self._lock:
            wanted = None if clients is None else set(clients)
            out = {name: _as_dict(state) for name, state in self._memory.items() if wanted is None or name in wanted}
            for name in sorted(self._spilled):
                if wanted is None or name in wanted:
                    out[name] = torch.load(self._path(name), map_location="cpu", weights_only=True)
            return out

    def replace_all(self, states: dict[str, dict[str, Any]]) -> None:
        """Forget every state and store ``states`` (as made by ``export``) instead."""
        with self._lock:
            for name in self._spilled:
                self._path(name).unlink(missing_ok=True)
            self._memory.clear()
            self._nbytes.clear()
            self._spilled.clear()
            self._generation.clear()
            for name, fields in states.items():
                self._generation[name] = next(self._counter)
                self._keep(name, ClientState(**fields))

    def _keep(self, client: str, state: ClientState) -> None:
        self._memory[client] = state
        self._memory.move_to_end(client)
        self._nbytes[client] = state_nbytes(_as_dict(state))
        if self._spill_dir is None:
            return
        while len(self._memory) > self._max_in_memory:
            oldest, old_state = self._memory.popitem(last=False)
            del self._nbytes[oldest]
            self._spill(oldest, old_state)

    def _spill(self, client: str, state: ClientState) -> None:
        assert self._spill_dir is not None
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        torch.save(_as_dict(state), self._path(client))
        self._spilled.add(client)

    def _load(self, client: str) -> ClientState:
        path = self._path(client)
        fields = torch.load(path, map_location="cpu", weights_only=True)
        path.unlink()
        self._spilled.discard(client)
        return ClientState(**fields)

    def _path(self, client: str) -> Path:
        assert self._spill_dir is not None
        # Hashing keeps any client name a safe, fixed-length file name.
        name = hashlib.blake2b(client.encode("utf-8"), digest_size=16).hexdigest()
        return self._spill_dir / f"{name}.pt"


def _as_dict(state: ClientState) -> dict[str, Any]:
    # Not dataclasses.asdict: it deep-copies every tensor.
    return {f.name: getattr(state, f.name) for f in fields(state)}


def state_nbytes(value: Any) -> int:
    """Give the bytes of every tensor inside ``value`` (nested dicts, lists and tuples are walked)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(state_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_nbytes(v) for v in value)
    return 0
