"""Work handlers: train, validate and aggregate with torch, in worker threads, on device-pool slots."""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

import anyio
import torch

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

__all__ = ["WorkHandlers"]


def _with_threads(threads: int, call: Callable[[], Any]) -> Any:
    # torch's thread count is a per-thread OpenMP setting: set in the event loop's thread it does not reach
    # anyio's workers, and each worker would start a team as large as the machine. Several such teams on
    # the same cores made CPU training 4x slower than on one thread (docs/benchmarks.md). The count is a
    # config key, never derived from `parallel`: it changes the last bits of float reductions.
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return call()


class WorkHandlers:
    """Answers ClientDispatched, ValScheduled and UploadsClosed by calling a ``Federation``.

    Each client's torch work (training and upload, or validation) runs in ``anyio.to_thread.run_sync``
    while it holds one slot of the device pool, so no more torch calls run at once than there are slots;
    the event loop only moves events.
    """

    def __init__(self, federation: Any, pool: DevicePool, bus: EventBus, context: RunContext, *,
                 torch_threads: int = 1) -> None:
        self.federation = federation
        self.pool = pool
        self.bus = bus
        self.context = context
        self.threads = torch_threads

    async def _in_worker(self, call: Callable[..., Any], **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(_with_threads, self.threads, partial(call, **kwargs))

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
            ran, result, upload = await self._in_worker(self._train_and_upload, ids=ids, device=slot.device,
                                                        state=ev.state)
            await self._emit(TrainDone, **ids, **where, ran_s=ran, samples=result.samples, metrics=result.metrics)
        await self._emit(ClientUploaded, **ids, samples=upload.samples, nbytes=upload.nbytes)

    def _train_and_upload(self, ids: dict[str, Any], device: str, state: str) -> tuple[float, Any, Any]:
        # One trip to the worker thread for both: each trip costs a thread wake-up and a loop wake-up.
        began = time.monotonic()
        result = self.federation.train(**ids, device=device, state=state)
        ran = time.monotonic() - began
        return ran, result, self.federation.upload(client=ids["client"], round=ids["round"])

    async def validate(self, ev: ValScheduled) -> None:
        async with self.pool.slot() as slot:
            where = dict(device=slot.device, slot=slot.index)
            await self._emit(ValStarted, round=ev.round, client=ev.client, **where, waited_s=slot.waited_s)
            began = time.monotonic()
            results = await self._in_worker(self.federation.validate, client=ev.client, tasks=ev.tasks,
                                            round=ev.round, device=slot.device)
            ran = time.monotonic() - began
            for task in ev.tasks:
                res = results[task]
                await self._emit(ValDone, round=ev.round, client=ev.client, task=task, **where, ran_s=ran,
                                 samples=res.samples, metrics=res.metrics)

    async def aggregate(self, ev: UploadsClosed) -> None:
        began = time.monotonic()
        result = await self._in_worker(self.federation.aggregate, round=ev.round, clients=ev.clients)
        await self._emit(Aggregated, round=ev.round, clients=tuple(result.clients), samples=result.samples,
                         ran_s=time.monotonic() - began)
