"""Simulated work handlers: the dry run's twins of the train, validate and aggregate handlers.

They take real device-pool slots and emit exactly the events the real handlers emit, but train nothing.
Each piece of work is given a modelled duration (batches × ``dry_run_opts.*_s_per_batch``) and placed on
a virtual clock per slot; the round's phases are barriers, as in a real run. The largest clock at the end
is the predicted makespan.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping

import anyio
from fedevents.engine.bus import EventBus, Subscription
from fedevents.engine.context import RunContext
from fedevents.engine.devices import DevicePool
from fedevents.engine.events import (
    Aggregated,
    CheckpointSaved,
    ClientDispatched,
    ClientUploaded,
    RoundFinished,
    RoundStarted,
    TrainDone,
    TrainStarted,
    UploadsClosed,
    ValDone,
    ValScheduled,
    ValStarted,
)
from fedevents.engine.runner import due

__all__ = ["SimulatedWork"]


class SimulatedWork:
    """Answers the work events without torch; ``summary()`` reports the modelled schedule."""

    def __init__(self, config: Mapping[str, Any], pool: DevicePool, bus: EventBus, context: RunContext) -> None:
        task_opts = config["task_opts"]
        synth = task_opts["synthetic"]
        costs = config["dry_run_opts"]
        self.pool, self.bus, self.context = pool, bus, context
        self.checkpoint_interval = config["exp_opts"]["checkpoint_interval"]
        self.rounds = config["exp_opts"]["comm_rounds"]
        self.train_samples = synth["samples_per_client"]
        self.val_samples = synth["test_size"]
        batches = math.ceil(self.train_samples / task_opts["batch_size"]) * task_opts["train_epochs"]
        self.train_s = batches * costs["train_s_per_batch"]
        self.val_s_per_task = math.ceil(self.val_samples / task_opts["batch_size"]) * costs["val_s_per_batch"]
        self.per_slot: Counter[tuple[str, int]] = Counter()
        self._free_at: dict[tuple[str, int], float] = {}
        self._phase_start = 0.0
        self._phase_key: tuple[int, str] = (-1, "")

    def subscribe(self, bus: EventBus) -> list[Subscription]:
        return [
            bus.subscribe(ClientDispatched, self.train, work=True),
            bus.subscribe(ValScheduled, self.validate, work=True),
            bus.subscribe(UploadsClosed, self.aggregate, work=True),
            bus.subscribe(RoundStarted, lambda ev: self._barrier((ev.round, "round"))),
            bus.subscribe(RoundFinished, self.checkpoint, work=True, priority=-1_000),
        ]

    def _barrier(self, key: tuple[int, str]) -> None:
        if key != self._phase_key:
            self._phase_key = key
            self._phase_start = max(self._free_at.values(), default=self._phase_start)

    def _place(self, where: tuple[str, int], seconds: float) -> None:
        start = max(self._free_at.get(where, 0.0), self._phase_start)
        self._free_at[where] = start + seconds
        self.per_slot[where] += 1

    async def _emit(self, event_type: type, **fields: Any) -> None:
        await self.bus.emit(self.context.make(event_type, **fields))

    async def train(self, ev: ClientDispatched) -> None:
        ids = dict(round=ev.round, client=ev.client, task=ev.task)
        self._barrier((ev.round, "train"))
        async with self.pool.slot() as slot:
            where = dict(device=slot.device, slot=slot.index, waited_s=slot.waited_s)
            await self._emit(TrainStarted, **ids, **where)
            await anyio.sleep(0)  # hold the slot across a checkpoint so concurrent clients spread out
            self._place((slot.device, slot.index), self.train_s)
            await self._emit(TrainDone, **ids, **where, ran_s=0.0, samples=self.train_samples, metrics={})
        await self._emit(ClientUploaded, **ids, samples=self.train_samples, nbytes=0)

    async def validate(self, ev: ValScheduled) -> None:
        self._barrier((ev.round, "validate"))
        async with self.pool.slot() as slot:
            where = dict(device=slot.device, slot=slot.index)
            await self._emit(ValStarted, round=ev.round, client=ev.client, **where, waited_s=slot.waited_s)
            await anyio.sleep(0)
            self._place((slot.device, slot.index), self.val_s_per_task * len(ev.tasks))
            for task in ev.tasks:
                await self._emit(ValDone, round=ev.round, client=ev.client, task=task, **where, ran_s=0.0,
                                 samples=self.val_samples, metrics={})

    async def aggregate(self, ev: UploadsClosed) -> None:
        await self._emit(Aggregated, round=ev.round, clients=ev.clients,
                         samples=self.train_samples * len(ev.clients), ran_s=0.0)

    async def checkpoint(self, ev: RoundFinished) -> None:
        """Say when a real run would checkpoint; nothing is written."""
        if due(ev.round, self.checkpoint_interval, self.rounds):
            await self._emit(CheckpointSaved, round=ev.round, path="(dry run: not written)", nbytes=0, seconds=0.0)

    def summary(self) -> dict[str, Any]:
        """Work items per device slot and the predicted makespan in seconds."""
        return {
            "per_slot": {f"{d}/slot{i}": n for (d, i), n in sorted(self.per_slot.items())},
            "predicted_makespan_s": max(self._free_at.values(), default=0.0),
            "train_s_each": self.train_s,
            "val_s_per_task": self.val_s_per_task,
        }
