"""Handlers that steer a run: what they may do (RunControl), early stopping and keeping the best model.

A handler that wants to steer defines ``bind(control)``; fedevents calls it with the run's ``RunControl``
before the run starts (YAML handlers and ``Experiment.add`` alike). Through it a handler may end the run
after the current round, and read a snapshot of the global model or of a client's stored state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from fedevents.engine.bus import EventBus, Subscription
from fedevents.engine.events import GlobalValDone, RoundFinished, ValDone, ValReused

from .atomic import write_atomic

__all__ = ["BestModel", "EarlyStopping", "RunControl"]


class RunControl:
    """What a handler may do to the run it watches."""

    def __init__(self, experiment: Any, federation: Any | None) -> None:
        self._experiment = experiment
        self._federation = federation

    def subscribe(self, bus: EventBus) -> list[Subscription]:
        return []

    def finish_after_round(self, reason: str) -> None:
        """End the run well after the round now running: status ``stopped``, exit status 0."""
        self._experiment.finish_after_round(reason)

    def global_model(self) -> dict[str, torch.Tensor]:
        """A copy of the global model's state as it is now (after the last aggregation)."""
        return {name: t.clone() for name, t in self._need_federation("global_model").server_state().items()}

    def client_state(self, client: str) -> Any:
        """``client``'s stored state (model, optimizer, method memory; read-only), or None if it never trained."""
        return self._need_federation("client_state").store.get(client)

    def _need_federation(self, what: str) -> Any:
        if self._federation is None:
            raise RuntimeError(f"{what}: expected a run that trains, found a dry run (it has no model)")
        return self._federation


class _WatchMetric:
    """The mean of ``metric`` over one validation round, global model or clients, and whether it improved."""

    def __init__(self, metric: str, mode: str, scope: str, min_delta: float) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', found {mode!r}")
        if scope not in ("global", "local"):
            raise ValueError(f"scope: expected 'global' or 'local', found {scope!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"min_delta: expected a number >= 0, found {min_delta!r}")
        self.metric, self.mode, self.scope, self.min_delta = metric, mode, scope, float(min_delta)
        self.best: float | None = None
        self.best_round: int | None = None
        self._sums: dict[int, list[float]] = {}

    def subscribe(self, bus: EventBus, on_round: Any) -> list[Subscription]:
        if self.scope == "global":
            return [bus.subscribe(GlobalValDone, self._scored), bus.subscribe(RoundFinished, on_round)]
        return [bus.subscribe(ValDone, self._scored), bus.subscribe(ValReused, self._kept),
                bus.subscribe(RoundFinished, on_round)]

    def _kept(self, ev: ValReused) -> None:
        for scores in ev.scores:
            for metrics in scores.values():
                self._add(ev.round, metrics)

    def _scored(self, ev: GlobalValDone | ValDone) -> None:
        self._add(ev.round, ev.metrics)

    def _add(self, rnd: int, metrics: Any) -> None:
        value = metrics.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            acc = self._sums.setdefault(rnd, [0.0, 0])
            acc[0] += value
            acc[1] += 1

    def round_value(self, rnd: int) -> float | None:
        """The round's mean, or None if the metric was not scored in it."""
        total, count = self._sums.pop(rnd, (0.0, 0))
        return total / count if count else None

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        gain = value - self.best if self.mode == "max" else self.best - value
        return gain > self.min_delta


class _Steering:
    """A handler that watches one metric per validation round and may act on the run through its control."""

    def __init__(self, metric: str, mode: str, scope: str, min_delta: float) -> None:
        self.watch = _WatchMetric(metric, mode, scope, min_delta)
        self.control: RunControl | None = None

    def bind(self, control: RunControl) -> None:
        self.control = control

    def subscribe(self, bus: EventBus) -> list[Subscription]:
        return self.watch.subscribe(bus, self._round)

    def _round(self, ev: RoundFinished) -> None:
        raise NotImplementedError


class EarlyStopping(_Steering):
    """End the run when ``metric`` has not improved for ``patience`` validation rounds in a row.

    The metric is averaged over the tasks of the global model (``scope: global``, needs ``val_model`` global
    or both) or over every client and task scored (``scope: local``). Improving means rising by more than
    ``min_delta`` (``mode: max``) or falling by more than it (``mode: min``).
    """

    def __init__(self, metric: str = "val_acc", patience: int = 3, mode: str = "max", scope: str = "global",
                 min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience: expected an int >= 1, found {patience!r}")
        super().__init__(metric, mode, scope, min_delta)
        self.patience = patience
        self.stale = 0

    def _round(self, ev: RoundFinished) -> None:
        value = self.watch.round_value(ev.round)
        if value is None:
            return
        if self.watch.improves(value):
            self.watch.best, self.watch.best_round, self.stale = value, ev.round, 0
            return
        self.stale += 1
        if self.stale >= self.patience and self.control is not None:
            self.control.finish_after_round(
                f"early stopping: {self.watch.metric} did not improve on {self.watch.best:.4f} (round "
                f"{self.watch.best_round}) for {self.patience} validation rounds")


class BestModel(_Steering):
    """Save the global model to ``path`` whenever ``metric`` improves (atomically; ``torch.load`` reads it).

    The file holds ``{"round", "metric", "value", "model"}``; ``model`` is the global state dict after the
    round's aggregation, the one that was scored.
    """

    def __init__(self, path: str, metric: str = "val_acc", mode: str = "max", scope: str = "global",
                 min_delta: float = 0.0) -> None:
        super().__init__(metric, mode, scope, min_delta)
        self.path = Path(path)
        self.saved: list[int] = []

    def _round(self, ev: RoundFinished) -> None:
        value = self.watch.round_value(ev.round)
        if value is None or not self.watch.improves(value) or self.control is None:
            return
        self.watch.best, self.watch.best_round = value, ev.round
        state = {"round": ev.round, "metric": self.watch.metric, "value": value, "model": self.control.global_model()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda f: torch.save(state, f))
        self.saved.append(ev.round)

