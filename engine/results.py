"""What ``Experiment.run()`` gives back: the run's id, status, record path and its metrics per round."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .bus import EventBus, Subscription
from .events import ExperimentFinished, GlobalValDone, TrainDone, ValDone, ValReused

__all__ = ["RoundMetrics", "RunResult", "ResultTracker"]


@dataclass(frozen=True)
class RoundMetrics:
    """One round's metrics, each the mean over the clients (and tasks) that reported it."""

    train: Mapping[str, float] = field(default_factory=dict)
    #: Each client's own model (``exp_opts.val_model`` local or both).
    val: Mapping[str, float] = field(default_factory=dict)
    #: The global model on the server's test set (``exp_opts.val_model`` global or both).
    global_val: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunResult:
    """A finished run: ``status`` is ``finished`` or ``stopped`` (a failed run raises instead)."""

    run_id: str
    status: str
    record: Path
    rounds: Mapping[int, RoundMetrics]
    stopped: str = ""

    @property
    def final(self) -> RoundMetrics:
        """The metrics of the last round that has any."""
        return self.rounds[max(self.rounds)] if self.rounds else RoundMetrics()

    def last(self, kind: str, metric: str) -> float | None:
        """The latest round's value of ``metric`` in ``kind`` ("train", "val" or "global_val"), or None."""
        for rnd in sorted(self.rounds, reverse=True):
            value = getattr(self.rounds[rnd], kind).get(metric)
            if value is not None:
                return value
        return None


class ResultTracker:
    """Sums every metric per round and kind while the run goes, for its RunResult."""

    def __init__(self) -> None:
        self._sums: dict[int, dict[str, dict[str, list[float]]]] = {}
        self.finished: ExperimentFinished | None = None

    def subscribe(self, bus: EventBus) -> list[Subscription]:
        return [
            bus.subscribe(TrainDone, lambda ev: self._add(ev.round, "train", ev.metrics)),
            bus.subscribe(ValDone, lambda ev: self._add(ev.round, "val", ev.metrics)),
            bus.subscribe(ValReused, self._reused),
            bus.subscribe(GlobalValDone, lambda ev: self._add(ev.round, "global_val", ev.metrics)),
            bus.subscribe(ExperimentFinished, self._finish),
        ]

    def _reused(self, ev: ValReused) -> None:
        # Kept scores count in the round's means as the ValDone events they stand for would.
        for scores in ev.scores:
            for metrics in scores.values():
                self._add(ev.round, "val", metrics)

    def _finish(self, ev: ExperimentFinished) -> None:
        self.finished = ev

    def _add(self, rnd: int, kind: str, metrics: Mapping[str, float]) -> None:
        sums = self._sums.setdefault(rnd, {}).setdefault(kind, {})
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                acc = sums.setdefault(name, [0.0, 0])
                acc[0] += value
                acc[1] += 1

    def result(self, run_id: str, record: Path) -> RunResult:
        rounds = {
            rnd: RoundMetrics(**{kind: {name: total / n for name, (total, n) in sums.items()}
                                 for kind, sums in kinds.items()})
            for rnd, kinds in sorted(self._sums.items())
        }
        stopped = self.finished.stopped if self.finished is not None else ""
        return RunResult(run_id=run_id, status="stopped" if stopped else "finished", record=record, rounds=rounds,
                         stopped=stopped)
