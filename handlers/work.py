"""Work handlers: train, validate and aggregate with torch, in worker threads, on device-pool slots."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import anyio
import anyio.from_thread
import anyio.lowlevel
import torch
from fedevents.engine.bus import EventBus, Subscription
from fedevents.engine.context import RunContext
from fedevents.engine.devices import DevicePool, Slot
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

__all__ = ["WorkHandlers", "ClientTimeout"]


class ClientTimeout(Exception):
    """A client's work ran longer than ``exp_opts.client_timeout_s``."""


def _with_threads(threads: int, call: Callable[[], Any]) -> Any:
    # torch's thread count is a per-thread OpenMP setting: set in the event loop's thread it does not reach
    # anyio's workers, and each worker would start a team as large as the machine. Several such teams on
    # the same cores made CPU training 4x slower than on one thread (docs/benchmarks.md). The count is a
    # config key, never derived from `parallel`: it changes the last bits of float reductions.
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return call()


@dataclass
class _Job:
    """One client's work in a worker thread, and who returns its slot if the client times out."""

    compute: Callable[[], Any]
    finish: Callable[[Any], Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False
    done: bool = False
    result: Any = None


class WorkHandlers:
    """Answers ClientDispatched, ValScheduled and UploadsClosed by calling a ``Federation``.

    Each client's torch work (training and upload, or validation) runs in ``anyio.to_thread.run_sync``
    while it holds one slot of the device pool, so no more torch calls run at once than there are slots;
    the event loop only moves events. With ``timeout_s``, a client whose work runs longer fails with
    ``ClientTimeout``: its result is thrown away when it arrives, and its slot stays taken until then.
    """

    def __init__(self, federation: Any, pool: DevicePool, bus: EventBus, context: RunContext, *,
                 torch_threads: int = 1, timeout_s: float | None = None) -> None:
        self.federation = federation
        self.pool = pool
        self.bus = bus
        self.context = context
        self.threads = torch_threads
        self.timeout_s = timeout_s

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

        def compute() -> tuple[float, Any]:
            began = time.monotonic()
            result = self.federation.train(**ids, device=slot.device, state=ev.state, commit=False)
            return time.monotonic() - began, result

        def finish(out: tuple[float, Any]) -> tuple[float, Any, Any]:
            ran, result = out
            committed = self.federation.commit(ev.client, result)
            return ran, committed, self.federation.upload(client=ev.client, round=ev.round)

        slot = await self.pool.acquire()
        where = dict(device=slot.device, slot=slot.index, waited_s=slot.waited_s)
        async with _SlotKeeper(self.pool, slot) as keep:
            await self._emit(TrainStarted, **ids, **where)
            ran, result, upload = await self._run(_Job(compute, finish), keep, f"training {ev.client}")
            await self._emit(TrainDone, **ids, **where, ran_s=ran, samples=result.samples, metrics=result.metrics)
        await self._emit(ClientUploaded, **ids, samples=upload.samples, nbytes=upload.nbytes)

    async def validate(self, ev: ValScheduled) -> None:
        call = partial(self.federation.validate, client=ev.client, tasks=ev.tasks, round=ev.round)
        slot = await self.pool.acquire()
        where = dict(device=slot.device, slot=slot.index)
        async with _SlotKeeper(self.pool, slot) as keep:
            await self._emit(ValStarted, round=ev.round, client=ev.client, **where, waited_s=slot.waited_s)
            began = time.monotonic()
            job = _Job(partial(call, device=slot.device), lambda results: results)
            results = await self._run(job, keep, f"validating {ev.client}")
            ran = time.monotonic() - began
            for task in ev.tasks:
                res = results[task]
                await self._emit(ValDone, round=ev.round, client=ev.client, task=task, **where, ran_s=ran,
                                 samples=res.samples, metrics=res.metrics)

    async def aggregate(self, ev: UploadsClosed) -> None:
        began = time.monotonic()
        call = partial(self.federation.aggregate, round=ev.round, clients=ev.clients)
        result = await anyio.to_thread.run_sync(_with_threads, self.threads, call)
        await self._emit(Aggregated, round=ev.round, clients=tuple(result.clients), samples=result.samples,
                         ran_s=time.monotonic() - began)

    async def _run(self, job: _Job, keep: "_SlotKeeper", what: str) -> Any:
        """Run ``job`` in a worker thread, within the time limit if there is one."""

        def in_thread() -> Any:
            out = _with_threads(self.threads, job.compute)
            with job.lock:
                if job.abandoned:  # too late: the engine has failed this client already
                    late = True
                else:
                    late = False
                    job.result = job.finish(out)
                    job.done = True
            if late:
                keep.release_from_thread()
            return job.result

        if self.timeout_s is None:
            return await anyio.to_thread.run_sync(in_thread)
        with anyio.move_on_after(self.timeout_s):
            return await anyio.to_thread.run_sync(in_thread, abandon_on_cancel=True)
        with job.lock:
            if job.done:  # finished just as the time ran out
                return job.result
            job.abandoned = True
        keep.hand_over()
        raise ClientTimeout(f"{what} took longer than exp_opts.client_timeout_s = {self.timeout_s:g}s; "
                            f"its result is discarded")


class _SlotKeeper:
    """Returns a slot when the client is done, unless a timed-out thread took over that duty."""

    def __init__(self, pool: DevicePool, slot: Slot) -> None:
        self.pool = pool
        self.slot = slot
        self.handed_over = False
        self.token = anyio.lowlevel.current_token()

    def hand_over(self) -> None:
        self.handed_over = True

    def release_from_thread(self) -> None:
        try:
            anyio.from_thread.run_sync(self.pool.release, self.slot, token=self.token)
        except RuntimeError:  # the event loop has ended; nothing waits for the slot any more
            pass

    async def __aenter__(self) -> "_SlotKeeper":
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.handed_over:
            self.pool.release(self.slot)
