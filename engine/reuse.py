"""Which clients' validation scores still hold: the engine's ledger of what each score was computed from.

Validation is deterministic: a client's scores depend only on the model it is scored with and its own test
data. That model is its stored state, which changes only when it is sent to train, or, for a client with no
stored state yet, the global model, which changes with every aggregation. The ledger counts both per client
from what the engine itself did (dispatches, successful trainings, closed uploads) and keeps each client's
last scores with what they were computed from; a client whose count has not moved since keeps its scores.
Counting dispatches rather than commits errs on the safe side: a training that failed after storing a state
still makes the client be scored again.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Sequence

__all__ = ["ScoreLedger"]

#: What a score was computed from: (dispatches of the client, aggregations so far, or -1 when the client
#: has a stored state of its own and the global model plays no part).
_Basis = tuple[int, int]


class ScoreLedger:
    """Tells which clients may keep their last validation scores, and keeps those scores.

    With ``enabled`` False nothing is kept and every client is scored again (``exp_opts.val_reuse: false``,
    or a method whose scores read more than the client's stored state). ``state_dict()`` travels with each
    checkpoint, so a resumed run keeps exactly the scores the uninterrupted run keeps.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._aggregations = 0
        self._dispatches: dict[str, int] = {}
        self._own: set[str] = set()  # clients that stored a state of their own in this process
        self._pending: dict[str, dict[str, Mapping[str, float]]] = {}
        # client -> (round scored in, what it was computed from, its scores as ((task, ((metric, value), ...)), ...)).
        # Tuples of strings and numbers only: the garbage collector stops tracking them, where dicts kept for
        # 100,000 clients would be walked by every full collection and cost more than the scores save.
        self._kept: dict[str, tuple[int, _Basis, tuple[tuple[str, tuple[tuple[str, float], ...]], ...]]] = {}

    def dispatched(self, client: str) -> None:
        """``client`` was sent to train: whatever it stores from now on is a new state."""
        self._dispatches[client] = self._dispatches.get(client, 0) + 1

    def trained(self, client: str) -> None:
        """``client``'s training was stored: it is scored with its own model from now on."""
        self._own.add(client)

    def aggregated(self) -> None:
        """The global model may have changed: clients scored with it are scored again."""
        self._aggregations += 1

    def split(self, clients: Sequence[str]) -> tuple[list[str], list[str]]:
        """``clients`` as (those to score, those that keep their scores), each in the given order."""
        if not self.enabled or not self._kept:
            return list(clients), []
        score: list[str] = []
        keep: list[str] = []
        kept, basis = self._kept, self._basis
        for client in clients:
            last = kept.get(client)
            (keep if last is not None and last[1] == basis(client) else score).append(client)
        return score, keep

    def reused(self, clients: Sequence[str]) -> tuple[tuple[int, ...], tuple[Mapping[str, Mapping[str, float]], ...]]:
        """For ``clients`` (from ``split``): the rounds their kept scores come from, and the scores."""
        kept = self._kept
        return tuple(kept[c][0] for c in clients), tuple(_mapping(kept[c][2]) for c in clients)

    def score(self, client: str, task: str, metrics: Mapping[str, float]) -> None:
        """One task's scores of ``client`` arrived (a ValDone)."""
        if self.enabled:
            self._pending.setdefault(client, {})[task] = metrics

    def scored(self, client: str, rnd: int) -> None:
        """``client`` was scored on all its tasks in round ``rnd``: keep those scores."""
        scores = self._pending.pop(client, None)
        if self.enabled and scores is not None:
            self._kept[client] = (rnd, self._basis(client), _flat(scores))

    def failed(self, client: str) -> None:
        """``client``'s validation failed: it has no scores to keep and is scored next time."""
        self._pending.pop(client, None)
        self._kept.pop(client, None)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint carries (taken at a round's end): counts, and each kept client's round,
        basis and scores, as plain numbers, strings, lists and dicts."""
        kept = {client: [rnd, list(basis), {task: dict(metrics) for task, metrics in scores}]
                for client, (rnd, basis, scores) in self._kept.items()}
        return {"aggregations": self._aggregations, "dispatches": dict(self._dispatches),
                "own": sorted(self._own), "kept": kept}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``state_dict()``."""
        self._aggregations = int(state["aggregations"])
        self._dispatches = {client: int(n) for client, n in state["dispatches"].items()}
        self._own = set(state["own"])
        self._pending = {}
        self._kept = {client: (int(rnd), (int(basis[0]), int(basis[1])), _flat(scores))
                      for client, (rnd, basis, scores) in state["kept"].items()}

    def _basis(self, client: str) -> _Basis:
        return self._dispatches.get(client, 0), -1 if client in self._own else self._aggregations


def _flat(scores: Mapping[str, Mapping[str, float]]) -> tuple[tuple[str, tuple[tuple[str, float], ...]], ...]:
    return tuple((task, tuple(metrics.items())) for task, metrics in scores.items())


def _mapping(flat: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]) -> Mapping[str, Mapping[str, float]]:
    return MappingProxyType({task: MappingProxyType(dict(metrics)) for task, metrics in flat})
