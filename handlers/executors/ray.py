"""Client work on a Ray cluster: actors pinned to the nodes' devices, each holding a ``Worker`` built once.

The devices are the cluster's: every alive node's ``cpu`` and GPUs that the config's ``device`` list names
become places in the device pool (``ray_cluster.places`` names them). A GPU place gets one actor asking for
one GPU with ``max_concurrency = parallel``: its slots are the actor's threads, so four slots on a GPU are
four clients sharing one CUDA context. A ``cpu`` place gets one single-threaded actor per slot, each asking
for an equal share of the node's CPUs (at most one): threads of one process take turns on the GIL, so only
separate processes put several CPU cores to work. Jobs and results travel pickled, as to a worker process.

Every wait on Ray has a time limit: an actor the cluster cannot place within ``ray.timeout_s`` is an error
before the run, and a job is awaited in steps so that closing the executor ends the wait. An actor or node
that dies mid-job is a ``WorkerLost`` (a client failure) and the actor is made anew for later jobs. Ray
cannot interrupt a running task of a threaded actor: a timed-out job is cancelled (dropped if it has not
started), its slot is kept until it has really ended, and if it runs on past ``ray.stop_grace_s`` its actor
is killed (on a GPU, the other jobs on that actor fail as lost workers).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from fedevents.engine.config import ExperimentConfig
from fedevents.engine.devices import Slot
from fedevents.engine.errors import ConfigError, DeviceError
from fedevents.federated.registry import plugin_folders
from fedevents.federated.threads import with_threads

from . import ray_cluster
from .base import Executor, WorkerLost
from .ray_cluster import Place

__all__ = ["RayExecutor"]

#: How often a waiting job looks whether it was stopped or the executor closed (a Ray wait, not a sleep).
_STEP_S = 0.5


class _Host:
    """An actor holding the experiment's ``Worker``: of one GPU (``parallel`` jobs at once, one per thread)
    or of one CPU slot (one job at a time)."""

    def __init__(self, config: Any, seed: int, threads: int, folders: Any = None) -> None:
        from fedevents.federated.registry import remember_folders
        from fedevents.federated.worker import Worker

        # User modules next to the config are found on a node that sees the same folder (a local cluster);
        # elsewhere they must be importable there (installed on the nodes).
        remember_folders(folders or {})
        self._worker = Worker(config, seed)
        self._threads = threads

    def ready(self) -> bool:
        return True

    def train(self, job: Any) -> Any:
        return with_threads(self._threads, lambda: self._worker.train(job))

    def validate(self, job: Any) -> Any:
        return with_threads(self._threads, lambda: self._worker.validate(job))


class _Actor:
    """A live actor handle of a place (of one of its slots, for ``cpu``); ``lost`` once it died, so the
    next job makes a new one."""

    def __init__(self, place: Place, index: int, handle: Any) -> None:
        self.place = place
        self.index = index
        self.handle = handle
        self.lost = False

    @property
    def label(self) -> str:
        return f"{self.place.name} slot {self.index}" if self.place.device == "cpu" else self.place.name


@dataclass
class _Call:
    """A job on its way: its Ray reference once submitted, and when it was asked to stop."""

    ref: Any = None
    stopped_at: float | None = None


class RayExecutor(Executor):
    """Runs jobs on Ray actors on every node's devices; results equal the thread executor's."""

    name = "ray"

    def __init__(self, config: ExperimentConfig, worker_config: Any, seed: int, *, torch_threads: int = 1) -> None:
        opts = config.data["ray"]
        self._where = f"{config.source}: ray"
        self._timeout = float(opts["timeout_s"])
        self._grace = float(opts["stop_grace_s"])
        self._parallel = config.parallel
        self._args = (dict(worker_config), seed, torch_threads, plugin_folders())
        self._lock = threading.Lock()
        #: Signalled when a job leaves ``_call``: Ray must stay connected until every one has.
        self._left = threading.Condition(self._lock)
        self._running: dict[tuple[str, int], _Call] = {}
        self._actors: dict[tuple[str, int], _Actor] = {}
        self._closed = False
        self._ray = ray_cluster.import_ray(self._where)
        self._remote = self._ray.remote(_Host)
        ray_cluster.connect(opts, self._where)
        try:
            self._places = ray_cluster.places(self._ray.nodes(), config.devices, f"{config.source}: device")
            self._start(self._places)
        except BaseException:
            self.close()
            raise

    def devices(self) -> Sequence[str]:
        return [p.name for p in self._places]

    def train(self, job: Any, slot: Slot) -> Any:
        return self._call(slot, "train", job)

    def validate(self, job: Any, slot: Slot) -> Any:
        return self._call(slot, "validate", job)

    def stop(self, slot: Slot) -> None:
        with self._lock:
            call = self._running.get((slot.device, slot.index))
            if call is None:  # it has just ended
                return
            call.stopped_at = time.monotonic()
            ref = call.ref
        if ref is not None:
            # Drops the job if it has not started; a running one gets its cancel flag and ends on its own.
            self._ray.cancel(ref)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            actors, self._actors = list(self._actors.values()), {}
        for actor in actors:
            self._kill(actor)  # a job still running on one ends at once as a lost worker
        with self._left:
            # A Ray call after the disconnect would quietly start a new local Ray (Ray connects on first use).
            self._left.wait_for(lambda: not self._running, timeout=self._timeout)
        ray_cluster.disconnect()

    # -- actors -----------------------------------------------------------------------------------------

    def _start(self, places: Sequence[Place]) -> None:
        """An actor per GPU and per CPU slot, all ready within ``ray.timeout_s``, or a DeviceError naming
        the ones that the cluster could not place."""
        slots = [(p, i) for p in places for i in (range(self._parallel) if p.device == "cpu" else (0,))]
        self._actors = {(p.name, i): self._spawn(p, i) for p, i in slots}
        pending = {a.handle.ready.remote(): a for a in self._actors.values()}
        ready, _ = self._ray.wait(list(pending), num_returns=len(pending), timeout=self._timeout)
        missing = [pending[ref].label for ref in pending if ref not in ready]
        if missing:
            raise DeviceError(f"{self._where}.timeout_s: expected the Ray cluster to start a worker for each "
                              f"device within {self._timeout:g}s, found none started for {', '.join(missing)} "
                              f"(the node's CPUs/GPUs are taken, or its workers start slowly: raise ray.timeout_s)")
        for ref in ready:
            try:
                self._ray.get(ref, timeout=self._timeout)
            except self._ray.exceptions.RayActorError as exc:  # its Worker could not be built
                raise ConfigError(f"{self._where}: expected a worker on {pending[ref].label}, found it "
                                  f"failed to start: {_first_line(exc)}") from None

    def _spawn(self, place: Place, index: int) -> _Actor:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if place.device == "cpu":
            # Ray counts resources in steps of 1/10,000: round the share down so that all slots fit.
            share = min(1.0, int(place.cpus / self._parallel * 10_000) / 10_000)
            resources: dict[str, Any] = dict(num_cpus=share, max_concurrency=1)
        else:
            resources = dict(num_gpus=1, num_cpus=0, max_concurrency=self._parallel)
        remote = self._remote.options(
            max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(place.node_id, soft=False),
            **resources)
        return _Actor(place, index, remote.remote(*self._args))

    def _actor(self, slot: Slot) -> _Actor:
        """The live actor of ``slot``; made anew (and awaited) after the last one died."""
        with self._lock:
            if self._closed:
                raise WorkerLost("the ray executor is closed")
            actor = self._actors.get((slot.device, slot.index)) or self._actors[(slot.device, 0)]
            if not actor.lost:
                return actor
            actor = self._actors[(slot.device, actor.index)] = self._spawn(actor.place, actor.index)
        try:
            self._ray.get(actor.handle.ready.remote(), timeout=self._timeout)
        except Exception as exc:
            self._lose(actor)
            raise WorkerLost(f"no Ray worker for {actor.label}: {_first_line(exc)}") from None
        return actor

    def _lose(self, actor: _Actor) -> None:
        actor.lost = True
        self._kill(actor)

    def _kill(self, actor: _Actor) -> None:
        try:
            self._ray.kill(actor.handle, no_restart=True)
        except Exception:  # already gone with its node, or Ray is shut down
            pass

    # -- jobs -------------------------------------------------------------------------------------------

    def _call(self, slot: Slot, kind: str, job: Any) -> Any:
        key, call = (slot.device, slot.index), _Call()
        with self._lock:
            if self._closed:
                raise WorkerLost("the ray executor is closed")
            self._running[key] = call  # before anything else, so that a stop meanwhile is seen
        try:
            actor = self._actor(slot)
            ref = getattr(actor.handle, kind).remote(dataclasses.replace(job, device=actor.place.local))
            with self._lock:
                call.ref, stopped = ref, call.stopped_at is not None
            if stopped:
                self._ray.cancel(ref)
            self._await(call, actor)
            return self._result(ref, actor, slot)
        finally:
            with self._left:
                if self._running.get(key) is call:
                    del self._running[key]
                self._left.notify_all()

    def _await(self, call: _Call, actor: _Actor) -> None:
        """Wait until the job has a result, the executor closes, or a stopped job outlives its grace."""
        while not self._ray.wait([call.ref], timeout=_STEP_S)[0]:
            with self._lock:
                closed, stopped = self._closed, call.stopped_at
            if closed:
                raise WorkerLost("the ray executor closed while the job ran")
            if stopped is not None and time.monotonic() - stopped > self._grace:
                self._lose(actor)  # the only way to end a running task of a threaded actor
                return

    def _result(self, ref: Any, actor: _Actor, slot: Slot) -> Any:
        exc_types = self._ray.exceptions
        try:
            return self._ray.get(ref, timeout=self._timeout)
        except exc_types.RayTaskError as exc:
            raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
        except exc_types.TaskCancelledError:
            raise WorkerLost(f"the job on {slot.device} slot {slot.index} was cancelled") from None
        except exc_types.RayError as exc:  # its actor or node died, or cannot be placed any more
            self._lose(actor)
            raise WorkerLost(f"the Ray worker of {slot.device} (node {actor.place.node_ip}) was lost before "
                             f"answering: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
