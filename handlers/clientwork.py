"""The client-work handler: slots, time limits and the event protocol of every client's work.

It answers ClientDispatched, ValScheduled and UploadsClosed. For each client it takes a slot of the device
pool, emits TrainStarted, asks the driver (a ``Federation``) for the client's job, hands the job to an
executor (threads, worker processes, a Ray cluster or the dry run's clock), commits and uploads the result
in the driver, emits TrainDone and ClientUploaded; validation the same way with ValStarted and one
ValDone per task. Whatever the executor, the server, the client states and the events stay here, so every
executor writes the same record.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import anyio
import anyio.from_thread
import anyio.lowlevel
from fedevents.engine.bus import EventBus, Subscription
from fedevents.engine.context import RunContext
from fedevents.engine.devices import DevicePool, Slot
from fedevents.engine.events import (
    Aggregated,
    ClientDispatched,
    ClientUploaded,
    GlobalValDone,
    GlobalValScheduled,
    TrainDone,
    TrainStarted,
    UploadsClosed,
    ValDone,
    ValScheduled,
    ValStarted,
)

from fedevents.federated.progress import reporting_to

from .executors import Executor

__all__ = ["ClientWork", "ClientTimeout", "EpochNote"]

#: ``listener(client, device, slot, done, total)``: ``done`` of ``total`` local epochs of ``client`` finished.
EpochNote = Callable[[str, str, int, int, int], None]


class ClientTimeout(Exception):
    """A client's work ran longer than ``exp_opts.client_timeout_s``."""


@dataclass
class _Job:
    """One client's work: ``compute`` runs in a worker thread (or inline), ``finish`` commits its result
    unless the client has timed out meanwhile; the lock makes that decision once."""

    compute: Callable[[], Any]
    finish: Callable[[Any], Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False
    done: bool = False
    started: float | None = None  # when a worker thread began the work: the client's clock starts here
    result: Any = None
    error: BaseException | None = None


class ClientWork:
    """Runs each client's work through ``executor`` on slots of ``pool``, with ``federation`` as the driver.

    With ``timeout_s``, a client whose work runs longer fails with ``ClientTimeout``: the executor is asked
    to stop the job, its result is thrown away if it still arrives, and its slot stays taken until the job
    has really stopped.
    """

    def __init__(self, federation: Any, executor: Executor, pool: DevicePool, bus: EventBus,
                 context: RunContext, *, timeout_s: float | None = None) -> None:
        self.federation = federation
        self.executor = executor
        self.pool = pool
        self.bus = bus
        self.context = context
        self.timeout_s = timeout_s
        self._epoch_listeners: list[EpochNote] = []

    def on_epoch(self, listener: EpochNote) -> Callable[[], None]:
        """Have ``listener(client, device, slot, done, total)`` called after each local epoch; give its remover.

        It is called from the training thread (so it must be thread-safe and quick), for work that runs in
        this process: the thread executor's, not that of worker processes or a Ray cluster.
        """
        self._epoch_listeners.append(listener)
        return lambda: self._epoch_listeners.remove(listener)

    def _epoch_reporter(self, client: str, slot: Slot) -> Callable[[int, int], None] | None:
        listeners = tuple(self._epoch_listeners)
        if not listeners:
            return None

        def report(done: int, total: int) -> None:
            for listener in listeners:
                listener(client, slot.device, slot.index, done, total)

        return report

    def subscribe(self, bus: EventBus) -> list[Subscription]:
        return [
            bus.subscribe(ClientDispatched, self.train, work=True),
            bus.subscribe(ValScheduled, self.validate, work=True),
            bus.subscribe(UploadsClosed, self.aggregate, work=True),
            bus.subscribe(GlobalValScheduled, self.validate_global, work=True),
        ]

    def close(self) -> None:
        self.executor.close()

    async def _emit(self, event_type: type, **fields: Any) -> None:
        await self.bus.emit(self.context.make(event_type, **fields))

    async def train(self, ev: ClientDispatched) -> None:
        ids = dict(round=ev.round, client=ev.client, task=ev.task)
        fed, executor = self.federation, self.executor

        def compute() -> tuple[float, Any]:
            job = fed.train_job(**ids, device=slot.device, state=ev.state)
            began = time.monotonic()
            with reporting_to(self._epoch_reporter(ev.client, slot)):
                outcome = executor.train(job, slot)
            return time.monotonic() - began, outcome

        def finish(out: tuple[float, Any]) -> tuple[float, Any, Any]:
            ran, outcome = out
            committed = fed.commit(ev.client, outcome)
            return ran, committed, fed.upload(client=ev.client, round=ev.round)

        slot = await self.pool.acquire()
        where = dict(device=slot.device, slot=slot.index, waited_s=slot.waited_s)
        async with _SlotKeeper(self.pool, slot) as keep:
            await self._emit(TrainStarted, **ids, **where)
            ran, result, upload = await self._run(_Job(compute, finish), slot, keep, f"training {ev.client}")
            await self._emit(TrainDone, **ids, **where, ran_s=ran, samples=result.samples, metrics=result.metrics)
        await self._emit(ClientUploaded, **ids, samples=upload.samples, nbytes=upload.nbytes)

    async def validate(self, ev: ValScheduled) -> None:
        fed, executor = self.federation, self.executor

        def compute() -> Any:
            job = fed.val_job(client=ev.client, tasks=ev.tasks, round=ev.round, device=slot.device)
            return executor.validate(job, slot)

        slot = await self.pool.acquire()
        where = dict(device=slot.device, slot=slot.index)
        async with _SlotKeeper(self.pool, slot) as keep:
            await self._emit(ValStarted, round=ev.round, client=ev.client, **where, waited_s=slot.waited_s)
            began = time.monotonic()
            results = await self._run(_Job(compute, lambda results: results), slot, keep,
                                      f"validating {ev.client}")
            ran = time.monotonic() - began
            for task in ev.tasks:
                res = results[task]
                await self._emit(ValDone, round=ev.round, client=ev.client, task=task, **where, ran_s=ran,
                                 samples=res.samples, metrics=res.metrics)

    async def validate_global(self, ev: GlobalValScheduled) -> None:
        fed, executor = self.federation, self.executor

        def compute() -> Any:
            return executor.validate(fed.global_val_job(tasks=ev.tasks, round=ev.round, device=slot.device), slot)

        slot = await self.pool.acquire()
        where = dict(device=slot.device, slot=slot.index)
        async with _SlotKeeper(self.pool, slot) as keep:
            began = time.monotonic()
            results = await self._run(_Job(compute, lambda results: results), slot, keep, "validating the global model",
                                      client=False)
            ran = time.monotonic() - began
            for task in ev.tasks:
                res = results[task]
                await self._emit(GlobalValDone, round=ev.round, task=task, **where, ran_s=ran, samples=res.samples,
                                 metrics=res.metrics)

    async def aggregate(self, ev: UploadsClosed) -> None:
        began = time.monotonic()
        call = partial(self.federation.aggregate, round=ev.round, clients=ev.clients)
        result = call() if self.executor.inline else await anyio.to_thread.run_sync(call)
        await self._emit(Aggregated, round=ev.round, clients=tuple(result.clients), samples=result.samples,
                         ran_s=time.monotonic() - began)

    async def _run(self, job: _Job, slot: Slot, keep: "_SlotKeeper", what: str, *, client: bool = True) -> Any:
        """Run ``job`` in a worker thread (inline for an inline executor), within the client time limit if
        there is one; work that is not a client's (the global model's validation) has none."""
        limit = self.timeout_s if client else None
        if self.executor.inline:
            await anyio.lowlevel.checkpoint()  # let concurrent clients take their slots, as real work would
            return job.finish(job.compute())
        if not self.executor.ready(slot):  # starting a worker is not the client's time
            await anyio.to_thread.run_sync(self.executor.prepare, slot)

        def in_thread() -> Any:
            job.started = time.monotonic()
            try:
                out = job.compute()
                with job.lock:
                    if not job.abandoned:
                        job.result = job.finish(out)
                        job.done = True
                        return job.result
            except BaseException as exc:
                with job.lock:
                    if not job.abandoned:
                        job.error, job.done = exc, True
                        raise
            # Too late: the engine has failed this client already; only the slot is ours to give back.
            keep.release_from_thread()
            return None

        if limit is None:
            return await anyio.to_thread.run_sync(in_thread)
        box = await self._within_limit(in_thread, job, limit)
        if "error" in box:
            raise box["error"]
        if "result" in box:
            return box["result"]
        with job.lock:
            if job.done:  # finished just as the time ran out
                if job.error is not None:
                    raise job.error
                return job.result
            job.abandoned = True
        keep.hand_over()
        self.executor.stop(slot)
        raise ClientTimeout(f"{what} took longer than exp_opts.client_timeout_s = {limit:g}s; "
                            f"its result is discarded")

    async def _within_limit(self, in_thread: Callable[[], Any], job: _Job, limit: float) -> dict[str, Any]:
        """Run ``in_thread`` until it ends or has run ``limit`` seconds since it began in its thread; give its
        ``result`` or ``error``, or neither when its time ran out.

        The limit counts from ``job.started``, not from the request: time the event loop spent in a slow
        handler, or waiting for a free thread, is not the client's.
        """
        box: dict[str, Any] = {}
        ended = anyio.Event()

        async def run() -> None:
            try:
                box["result"] = await anyio.to_thread.run_sync(in_thread, abandon_on_cancel=True)
            except Exception as exc:  # the client's own error
                box["error"] = exc
            finally:
                ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            while not ended.is_set():
                began = job.started
                left = limit if began is None else began + limit - time.monotonic()
                if left <= 0:
                    break
                with anyio.move_on_after(left):
                    await ended.wait()
            tg.cancel_scope.cancel()
        return box


class _SlotKeeper:
    """Returns a slot when the client is done, unless a timed-out job's thread took over that duty."""

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
