"""The driver half of a federation: the server, the client store, jobs out and results in.

The handlers ask a ``Federation`` for a client's job (``train_job``, ``val_job``), hand the job to an executor
that runs it on a ``Worker`` (in a thread, a worker process or a Ray actor), then ``commit`` the result,
``upload`` it and ``aggregate``. The server, the client states and aggregation therefore stay in the driver
whatever runs the torch work, so every executor writes the same record. Every method may be called
from several threads at once. Randomness comes from ``(seed, round, client, task, purpose)`` only.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import torch

from .allocator import release_free_pages, share_one_heap
from .fedavg import AggregateResult
from .methods import METHODS, Method, ServerState, build_method
from .predictions import Prediction
from .seeds import generator
from .server import Server
from .sharing import share_equal
from .store import ClientState, ClientStore, state_nbytes
from .tasks import DATASETS, build_task_source
from .training import build_optimizer, build_scheduler
from .threads import in_threads
from .worker import TrainJob, TrainOutcome, ValJob, ValResult, Worker, build_loss

__all__ = ["METHODS", "DATASETS", "ClientDiverged", "Federation", "TrainResult", "UploadResult", "ValResult", "build_loss"]


class ClientDiverged(ArithmeticError):
    """A client's training produced a non-finite loss or non-finite weights (its learning rate too high)."""


def check_finite(client: str, outcome: TrainOutcome) -> None:
    """Raise ``ClientDiverged`` when a metric or a floating-point weight of ``outcome`` is NaN or infinite."""
    bad = sorted(name for name, value in outcome.metrics.items() if not math.isfinite(value))
    if bad:
        raise ClientDiverged(f"{client} diverged: {', '.join(f'{n} = {outcome.metrics[n]}' for n in bad)}")
    for name, tensor in outcome.state.model.items():
        # Integer buffers (batch counts) cannot hold a NaN.
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ClientDiverged(f"{client} diverged: weight {name} is not finite")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of floating-point ``tensor`` is finite.

    A sum over a NaN or an infinity is never finite, in whatever order it adds, so a finite sum settles it
    at a tenth of ``isfinite``'s cost per element (which matched a small client's whole training); only a
    sum that overflowed, or a tensor that is not finite, is looked at element by element.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What one client's committed training produced: its training samples and ``tr_acc`` / ``tr_loss``."""

    samples: int
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class UploadResult:
    """What one upload sent: the samples it weighs with and the bytes of its model state."""

    samples: int
    nbytes: int


class Federation:
    """Run one federated experiment's server side, and hand out the jobs its clients' work is made of."""

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        seed: int,
        spill_dir: str | None = None,
        max_in_memory: int = 256,
    ) -> None:
        share_one_heap()  # before the run's threads allocate
        self._config = config
        self._seed = seed
        #: torch's intra-op threads for the driver's own torch work (payloads, commits, aggregation), as the
        #: workers use for theirs: a reduction split over another number of threads changes its last bits.
        self.threads = int((config.get("exp_opts") or {}).get("torch_threads", 1))
        self._method = build_method(config["exp_method"], config.get("method_opts") or {}, seed=seed,
                                    legacy=bool((config.get("exp_opts") or {}).get("legacy")))
        self._worker: Worker | None = None
        self._worker_lock = threading.Lock()
        self._tasks = tasks = build_task_source(config, seed)
        model_opts = dict(config["model_opts"])
        initial = self._method.prepare(tasks.build_model(model_opts, generator(seed, "init")))
        # Building the optimizer, scheduler and loss once reports a bad option now, not in the first round.
        build_scheduler(config["scheduler_opts"], build_optimizer(config["optimizer_opts"], initial.parameters()))
        build_loss(config["criterion_opts"], model_opts.get("num_classes"))
        self._server = Server(initial.state_dict(), self._method)
        self._store = ClientStore(max_in_memory=max_in_memory, spill_dir=spill_dir)
        self._named = _clients_naming_a_model(config.get("clients"))

    @property
    def config(self) -> Mapping[str, Any]:
        """The experiment config a ``Worker`` for this federation is built from."""
        return self._config

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def store(self) -> ClientStore:
        """The clients' stored states (read it; the federation writes it)."""
        return self._store

    @property
    def method(self) -> Method:
        return self._method

    @property
    def worker(self) -> Worker:
        """A worker in this process, built on first use (the thread executor and tests run jobs on it)."""
        with self._worker_lock:
            if self._worker is None:
                self._worker = Worker(self._config, self._seed, tasks=self._tasks)
            return self._worker

    @in_threads
    def train_job(self, *, client: str, task: str, round: int, device: str, state: str) -> TrainJob:
        """The job of ``client``'s local round on ``task``: the server's payload and the client's stored state.

        ``state`` says how the client joins ("integrated" when new, "incremental" when known); the method
        decides what that means. A client with nothing stored (its earlier attempts failed) joins as new.
        """
        previous = self._store.get(client)
        if self._per_task(client):
            # A task's own model once it has one; before that the client's latest (FedSTIL's model in memory).
            previous = self._store.get(_task_key(client, task)) or previous
        joins = state if previous is not None else "integrated"
        return TrainJob(client=client, task=task, round=round, device=device, seed=self._seed,
                        payload=self._server.dispatch(client, joins), previous=previous)

    @in_threads
    def commit(self, client: str, outcome: TrainOutcome) -> TrainResult:
        """Store the state a local round produced as ``client``'s latest; give its samples and metrics.

        A client whose loss or weights are not finite raises ``ClientDiverged`` and stores nothing, so
        its update can never reach the aggregate.
        """
        check_finite(client, outcome)
        state = self._compact(outcome.state)
        self._store.put(client, state)
        if self._per_task(client):
            self._store.put(_task_key(client, state.task), state)
        return TrainResult(samples=outcome.samples, metrics=outcome.metrics)

    def _compact(self, state: ClientState) -> ClientState:
        """``state`` holding, by reference, every model tensor it shares bit for bit with the global model:
        a fine-tuned client's frozen weights are then stored once for all clients (with any executor, since
        the comparison happens here, in the driver)."""
        return replace(state, model=share_equal(state.model, self._server.state))

    @in_threads
    def train(self, *, client: str, task: str, round: int, device: str, state: str) -> TrainResult:
        """Train ``client`` here, in the calling thread, and commit its new state."""
        job = self.train_job(client=client, task=task, round=round, device=device, state=state)
        return self.commit(client, self.worker.train(job))

    @in_threads
    def upload(self, *, client: str, round: int) -> UploadResult:
        """Put ``client``'s latest trained state (as its method packs it) in the server's inbox for ``round``."""
        stored = self._store.get(client)
        if stored is None:
            raise LookupError(
                f"upload of {client!r} in round {round}: expected a client that has trained, found none"
            )
        upload = self._method.upload(stored.model, stored.samples, stored.memory)
        self._server.receive(client, round, upload)
        return UploadResult(samples=upload.samples,
                            nbytes=state_nbytes(upload.state) + state_nbytes(getattr(upload, "extras", {})))

    @in_threads
    def val_job(self, *, client: str, tasks: Sequence[str], round: int, device: str) -> ValJob:
        """The job of scoring ``client``'s stored model on ``tasks``; a client that never trained is scored
        with the current global model, and stays unstored."""
        stored = self._store.get(client)
        model = self._server.state if stored is None else stored.model
        models = None
        if self._per_task(client):
            models = {task: getattr(self._store.get(_task_key(client, task)), "model", model) for task in tasks}
        return ValJob(client=client, tasks=tuple(tasks), round=round, device=device, model=model, models=models)

    @in_threads
    def global_val_job(self, *, tasks: Sequence[str], round: int, device: str) -> ValJob:
        """The job of scoring the global model on each task's server-side test set."""
        return ValJob(client=None, tasks=tuple(tasks), round=round, device=device, model=self._server.state)

    @in_threads
    def validate(self, *, client: str, tasks: Sequence[str], round: int, device: str) -> dict[str, ValResult]:
        """Score ``client``'s model on each task's held-out split, here, in the calling thread."""
        return self.worker.validate(self.val_job(client=client, tasks=tasks, round=round, device=device))

    def _per_task(self, client: str) -> bool:
        """Whether ``client`` keeps a model per task: its method does so and it names no model (FedSTIL's rule)."""
        return self._method.models_per_task and client not in self._named

    @in_threads
    def aggregate(self, *, round: int, clients: Sequence[str]) -> AggregateResult:
        """Combine ``round``'s uploads from ``clients`` into the server's new state."""
        result = self._server.aggregate(round, clients)
        release_free_pages(state_nbytes(self._server.state))  # the old global model and the mean's sums are gone
        return result

    def server_state(self) -> dict[str, torch.Tensor]:
        """Give the global model state (its tensors are never changed in place)."""
        return self._server.state

    def state_dict(self, *, clients: Iterable[str] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs: the server's state and every client state that exists (only
        those of ``clients``, if given: a checkpoint asks for the ones that changed).

        Taken at a round boundary, when no upload is pending. Tensors, numbers, strings, lists and dicts
        only, so it loads with ``torch.load(..., weights_only=True)``.
        """
        return {"server": self._server.state_dict(), "clients": self._store.export(clients)}

    def predictions(self) -> dict[tuple[str, ...], Prediction]:
        """Tensors of ``state_dict()`` that others of it predict closely, by path (``("server", "model",
        name)``, ...), as the method names them (``Method.server_predictions``); a checkpoint stores each as
        its difference from the prediction."""
        server = ServerState(**self._server.state_dict())
        return {("server", *path): Prediction(p.rule, tuple(("server", *source) for source in p.sources))
                for path, p in self._method.server_predictions(server).items()}

    def replaced_on_dispatch(self, dispatches: Mapping[str, str], *,
                             states: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, frozenset[str]]:
        """The stored model entries that each client's next dispatch, to the task ``dispatches`` gives it,
        overwrites before anything reads them, by store key (the client's, and its model for that task when it
        keeps one per task): every stored key asked about, with an empty set where nothing is replaced.

        Asked at a round's end about clients whose next dispatch may be rounds away: their method names the
        entries (``Method.replaced_on_dispatch``), and only those the global model holds alike (name, dtype and
        shape) count, so that the global's tensor can stand in for them until the dispatch. ``states`` are
        stored states the caller exported already, by store key (the others are exported here).
        """
        tasks: dict[str, str] = {}
        for client, task in dispatches.items():
            tasks[client] = task
            if self._per_task(client):
                tasks[_task_key(client, task)] = task
        given = {key: states[key] for key in tasks if states is not None and key in states}
        missing = [key for key in tasks if key not in given]
        stored = {**given, **(self._store.export(missing) if missing else {})}
        server = ServerState(**self._server.state_dict())
        model = server.model
        out = {}
        for key, state in stored.items():
            replaced = self._method.replaced_on_dispatch(server, switching=state["task"] != tasks[key])
            out[key] = frozenset(name for name, t in state["model"].items()
                                 if replaced(name) and name in model and model[name].dtype == t.dtype
                                 and model[name].shape == t.shape)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``state_dict()``: the server's state and the client states are replaced (each
        model in the form its method keeps now, ``Method.upgrade``)."""
        upgrade = self._method.upgrade
        self._server.load_state({**state["server"], "model": upgrade(state["server"]["model"])})
        self._store.replace_all({key: {**fields, "model": upgrade(fields["model"])}
                                 for key, fields in state["clients"].items()})


def _clients_naming_a_model(clients: Any) -> frozenset[str]:
    """Clients whose config gives a ``model_ckpt_name``: they keep one model across their tasks."""
    if not isinstance(clients, Sequence):
        return frozenset()
    return frozenset(c["client_name"] for c in clients if c.get("model_ckpt_name"))


def _task_key(client: str, task: str) -> str:
    # '@' cannot occur in a client or task name (safe names), so these never collide with a client's key.
    return f"{client}@{task}"
