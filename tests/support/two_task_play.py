"""Two clients, two ReID tasks each, played through a Federation the way the engine drives it: what the
FedSTIL-family and stored-input tests replay and compare, one run against another.

Not a test module: tests import it by name (pyproject.toml puts tests/support on pytest's path).
"""

from __future__ import annotations

from typing import Any

import torch

from fedevents.federated.federation import Federation

CLIENTS = ("client-0", "client-1")


def play(fed: Federation, rounds: range) -> list[dict[str, float]]:
    """Train, upload and aggregate every client for ``rounds`` (task 0 in round 1, task 1 after: a switch in
    round 2); the training metrics in order, then each client's scores on its first task after the last round."""
    seen = []
    for r in rounds:
        for client in CLIENTS:
            task = f"{client}-task-{min(r - 1, 1)}"
            state = "integrated" if r == 1 else "incremental"
            seen.append(fed.train(client=client, task=task, round=r, device="cpu", state=state).metrics)
            fed.upload(client=client, round=r)
        fed.aggregate(round=r, clients=list(CLIENTS))
    for client in CLIENTS:
        scores = fed.validate(client=client, tasks=[f"{client}-task-0"], round=rounds[-1], device="cpu")
        seen.append(scores[f"{client}-task-0"].metrics)
    return seen


def flat(state: Any, prefix: str = "") -> dict[str, Any]:
    """A nested state as one mapping of ``a/b/0/`` paths to leaves."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in flat(value, f"{prefix}{key}/").items()}
    if isinstance(state, list):
        return {k: v for i, value in enumerate(state) for k, v in flat(value, f"{prefix}{i}/").items()}
    return {prefix: state}


def differences(a: Any, b: Any) -> list[str]:
    """The paths where two states differ (tensors compared exactly); the paths only one has if their
    shapes differ."""
    fa, fb = flat(a), flat(b)
    if fa.keys() != fb.keys():
        return sorted(fa.keys() ^ fb.keys())
    return [k for k, x in fa.items()
            if not (torch.equal(x, fb[k]) if isinstance(x, torch.Tensor) else x == fb[k])]
