"""Work handlers: train, validate and aggregate with torch, in worker threads, on device-pool slots."""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any

import anyio

from fedevents.engine.bus import EventBus, Subscription
from fedevents.engine.context import RunContext
from fedevents.engine.devices import DevicePool
from fedevents.engine.events import (
    Aggregated,
    ClientDispatched,
    ClientUploaded,
    TrainDone,
    TrainStarted,
    UploadsClosed,
    ValDone,
    ValScheduled,
    ValStarted,
)

__all__ = ["WorkHandlers", "share_cpu_threads"]


def share_cpu_threads(pool: DevicePool) -> None:
    """Split the machine's cores among concurrent CPU trainings so they do not oversubscribe them."""
    import torch

    cpu_slots = pool.parallel if "cpu" in pool.devices else 0
    if cpu_slots:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cpu_slots))


class WorkHandlers:
    """Answers ClientDispatched, ValScheduled and UploadsClosed by calling a ``Federation``.

    Each client's torch work runs in ``anyio.to_thread.run_sync`` while it holds one slot of the device
    pool; the event loop only moves events.
    """

    def __init__(self, federation: Any, pool: DevicePool, bus: EventBus, context: RunContext) -> None:
        self.federation = federation
        self.pool = pool
        self.bus = bus
        self.context = context

    def subscribe(self, bus: EventBus) -> list[Subscription]:
        return [
            bus.subscribe(ClientDispatched, self.train, work=True),
            bus.subscribe(ValScheduled, self.validate, work=True),
            bus.subscribe(UploadsClosed, self.aggregate, work=True),
        ]

    async def _emit(self, event_type: type, **fields: Any) -> None:
        await self.bus.emit(self.context.make(event_type, **fields))

    async def train(self, ev: ClientDispatched) -> None:
        ids = dict(round=ev.round, client=ev.client, task=ev.task)
        async with self.pool.slot() as slot:
            where = dict(device=slot.device, slot=slot.index, waited_s=slot.waited_s)
            await self._emit(TrainStarted, **ids, **where)
            began = time.monotonic()
            result = await anyio.to_thread.run_sync(
                partial(self.federation.train, **ids, device=slot.device, state=ev.state)
            )
            ran = time.monotonic() - began
            await self._emit(TrainDone, **ids, **where, ran_s=ran, samples=result.samples, metrics=result.metrics)
        upload = await anyio.to_thread.run_sync(partial(self.federation.upload, client=ev.client, round=ev.round))
        await self._emit(ClientUploaded, **ids, samples=upload.samples, nbytes=upload.nbytes)

    async def validate(self, ev: ValScheduled) -> None:
        async with self.pool.slot() as slot:
            where = dict(device=slot.device, slot=slot.index)
            await self._emit(ValStarted, round=ev.round, client=ev.client, **where, waited_s=slot.waited_s)
            began = time.monotonic()
            results = await anyio.to_thread.run_sync(
                partial(self.federation.validate, client=ev.client, tasks=ev.tasks, round=ev.round, device=slot.device)
            )
            ran = time.monotonic() - began
            for task in ev.tasks:
                res = results[task]
                await self._emit(ValDone, round=ev.round, client=ev.client, task=task, **where, ran_s=ran,
                                 samples=res.samples, metrics=res.metrics)

    async def aggregate(self, ev: UploadsClosed) -> None:
        began = time.monotonic()
        result = await anyio.to_thread.run_sync(
            partial(self.federation.aggregate, round=ev.round, clients=ev.clients)
        )
        await self._emit(Aggregated, round=ev.round, clients=tuple(result.clients), samples=result.samples,
                         ran_s=time.monotonic() - began)
