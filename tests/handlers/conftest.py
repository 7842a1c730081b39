"""Helpers for the sink tests: hand-stamped events on a fake clock, fed through a real bus."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import structlog

from fedevents.engine.bus import EventBus
from fedevents.engine.events import (
    Aggregated,
    ClientDispatched,
    ClientsSampled,
    ClientUploaded,
    Event,
    ExperimentFinished,
    ExperimentStarted,
    RoundFinished,
    RoundStarted,
    TrainDone,
    TrainStarted,
    UploadsClosed,
    ValDone,
    ValScheduled,
    ValStarted,
)

T0 = 1000.0  # the fake monotonic clock's reading at the run's first event


class Run:
    """Stamps events like the engine's RunContext does, but at chosen times ``at`` seconds after T0."""

    def __init__(self, bus: EventBus, run_id: str = "demo-run", exp_name: str = "demo") -> None:
        self.bus = bus
        self.run_id = run_id
        self.exp_name = exp_name
        self._seq = itertools.count(1)
        self.emitted: list[Event] = []

    def make(self, event_type: type[Event], at: float = 0.0, **fields: Any) -> Event:
        return event_type(run_id=self.run_id, exp_name=self.exp_name, seq=next(self._seq),
                          wall_time=1.7e9 + at, mono_time=T0 + at, **fields)

    async def emit(self, event_type: type[Event], at: float = 0.0, **fields: Any) -> Event:
        event = self.make(event_type, at, **fields)
        self.emitted.append(event)
        await self.bus.emit(event)
        return event

    async def start(self, rounds: int = 2) -> None:
        await self.emit(ExperimentStarted, 0.0, method="fedavg", rounds=rounds, clients=2, online_clients=2,
                        devices=("cpu", "cuda:0"), parallel=2, seed=1, dry_run=False)

    async def round_one(self) -> None:
        """Round 1: c0 trains on ('cpu', slot 1), c1 on ('cuda:0', slot 0); c0 is validated on two tasks."""
        await self.emit(RoundStarted, 0.25, round=1)
        await self.emit(ClientsSampled, 0.25, round=1, clients=("c0", "c1"), sample_seed=7)
        await self.emit(ClientDispatched, 0.25, round=1, client="c0", task="t0", state="integrated")
        await self.emit(ClientDispatched, 0.25, round=1, client="c1", task="t0", state="integrated")
        await self.emit(TrainStarted, 0.5, round=1, client="c0", task="t0", device="cpu", slot=1, waited_s=0.25)
        await self.emit(TrainStarted, 0.75, round=1, client="c1", task="t0", device="cuda:0", slot=0, waited_s=0.5)
        await self.emit(TrainDone, 2.0, round=1, client="c0", task="t0", device="cpu", slot=1, waited_s=0.25,
                        ran_s=1.5, samples=64, metrics={"tr_acc": 0.5, "tr_loss": 1.0})
        await self.emit(ClientUploaded, 2.0, round=1, client="c0", task="t0", samples=64, nbytes=1024)
        await self.emit(TrainDone, 2.5, round=1, client="c1", task="t0", device="cuda:0", slot=0, waited_s=0.5,
                        ran_s=1.75, samples=32, metrics={"tr_acc": 0.7, "tr_loss": 0.8})
        await self.emit(ClientUploaded, 2.5, round=1, client="c1", task="t0", samples=32, nbytes=1024)
        await self.emit(ValScheduled, 2.5, round=1, client="c0", tasks=("t0", "t1"))
        await self.emit(ValStarted, 3.0, round=1, client="c0", device="cpu", slot=1, waited_s=0.0)
        await self.emit(ValDone, 3.5, round=1, client="c0", task="t0", device="cpu", slot=1, ran_s=0.5,
                        samples=16, metrics={"val_acc": 0.4, "val_loss": 1.25})
        await self.emit(ValDone, 4.25, round=1, client="c0", task="t1", device="cpu", slot=1, ran_s=0.75,
                        samples=16, metrics={"val_acc": 0.6, "val_loss": 1.5})
        await self.emit(UploadsClosed, 4.25, round=1, clients=("c0", "c1"))
        await self.emit(Aggregated, 4.5, round=1, clients=("c0", "c1"), samples=96, ran_s=0.25)
        await self.emit(RoundFinished, 4.5, round=1, trained=2, failed=0, validated=1, seconds=4.25)

    async def finish(self) -> None:
        await self.emit(ExperimentFinished, 5.0, rounds=2, seconds=5.0)


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def run(bus: EventBus) -> Run:
    return Run(bus)


@pytest.fixture(autouse=True)
def _structlog_untouched():
    """Every sink test must leave structlog's configuration as it found it."""
    before = structlog.get_config()
    was_configured = structlog.is_configured()
    yield
    assert structlog.get_config() == before
    assert structlog.is_configured() == was_configured
