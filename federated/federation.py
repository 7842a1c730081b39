"""The facade the handlers call: train, upload, validate and aggregate for named clients.

Every method is synchronous and may run concurrently in worker threads for different clients. Randomness
comes from ``(seed, round, client, task, purpose)`` only, so results do not depend on which thread runs
first. Each worker thread keeps one model per device and loads whichever weights a call needs into it;
between calls a client's state lives on the CPU in a ``ClientStore``.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .criteria import build_reid_criterion
from .fedavg import AggregateResult
from .methods import METHODS, LocalRound, Method, ModelOutput, build_method
from .seeds import generator
from .server import Server
from .store import ClientState, ClientStore, state_nbytes
from .tasks import DATASETS, build_task_source
from .training import build_criterion, build_optimizer, build_scheduler, train_local

__all__ = ["METHODS", "DATASETS", "Federation", "TrainResult", "UploadResult", "ValResult"]



@dataclass(frozen=True, slots=True)
class TrainResult:
    """What one client's local training produced: its training samples and ``tr_acc`` / ``tr_loss``.

    ``pending`` holds the new client state when training ran with ``commit=False``; ``Federation.commit``
    stores it (a client that ran past its time limit is never committed).
    """

    samples: int
    metrics: dict[str, float]
    pending: ClientState | None = None


@dataclass(frozen=True, slots=True)
class UploadResult:
    """What one upload sent: the samples it weighs with and the bytes of its model state."""

    samples: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ValResult:
    """One client's score on one task's held-out split: ``val_acc`` / ``val_loss``."""

    samples: int
    metrics: dict[str, float]


class Federation:
    """Run one federated experiment's learning: a method's server and client halves over a task source."""

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        seed: int,
        spill_dir: str | None = None,
        max_in_memory: int = 256,
    ) -> None:
        task_opts = config["task_opts"]
        self._method = build_method(config["exp_method"], config.get("method_opts") or {})
        self._tasks = build_task_source(config, seed)
        self._seed = seed
        self._epochs = int(task_opts["train_epochs"])
        self._batch_size = int(task_opts["batch_size"])
        self._model_opts = dict(config["model_opts"])
        self._optimizer_opts = dict(config["optimizer_opts"])
        self._scheduler_opts = dict(config["scheduler_opts"])
        self._criterion = build_loss(config["criterion_opts"], self._model_opts.get("num_classes"))
        initial = self._initial_model()
        self._server = Server(initial.state_dict(), self._method)
        self._store = ClientStore(max_in_memory=max_in_memory, spill_dir=spill_dir)
        # Building a model costs more than training a small one for a round, so each worker thread keeps one
        # per device and loads whatever weights a call needs into it.
        self._models = threading.local()

    @property
    def store(self) -> ClientStore:
        """The clients' stored states (read it; the federation writes it)."""
        return self._store

    @property
    def method(self) -> Method:
        return self._method

    def train(self, *, client: str, task: str, round: int, device: str, state: str, commit: bool = True) -> TrainResult:
        """Train ``client`` on ``task`` from the server's payload for ``round`` and store its new state.

        ``state`` says how the client joins ("integrated" when new, "incremental" when known); the method
        decides what that means. The model trains on ``device``; the stored state goes back to the CPU. With
        ``commit=False`` the new state is returned in ``pending`` instead of stored.
        """
        dev = torch.device(device)
        model = self._model(dev)
        previous = self._store.get(client)
        # A client with nothing stored (its earlier attempts failed) joins as new, whatever it was called.
        joins = state if previous is not None else "integrated"
        rnd = LocalRound(
            client=client, task=task, round=round, device=dev, model=model,
            payload=self._server.dispatch(client, joins),
            memory=dict(previous.memory) if previous is not None else {},
            previous_model=previous.model if previous is not None else None,
            previous_task=previous.task if previous is not None else None,
            task_data=lambda name: tuple(t.to(dev) for t in self._tasks.train_data(client, name)),
            forward=lambda xb: _output(model(xb)),
        )
        self._method.start(rnd)
        x, y = rnd.task_data(task)
        x, y = self._method.training_data(rnd, x, y)
        optimizer, scheduler = self._optimizer_for(model, previous)

        def batch_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = _output(model(xb))
            base = self._criterion(out.logits, out.features, yb)
            return self._method.batch_loss(rnd, xb, yb, out, base), out.logits

        scores = train_local(
            model, optimizer, scheduler, None, x, y, epochs=self._epochs, batch_size=self._batch_size,
            shuffle=generator(self._seed, round, client, task, "shuffle"), batch_loss=batch_loss,
            augment=self._tasks.augment, augment_generator=generator(self._seed, round, client, task, "augment"),
        )
        self._method.finish(rnd)
        samples = int(y.shape[0])
        pending = _snapshot(model, optimizer, scheduler, previous, samples, _to_cpu(rnd.memory, clone=False), task)
        result = TrainResult(samples=samples, metrics={"tr_acc": scores.acc, "tr_loss": scores.loss}, pending=pending)
        return self.commit(client, result) if commit else result

    def commit(self, client: str, result: TrainResult) -> TrainResult:
        """Store the state a ``commit=False`` training left pending; gives the result without it."""
        if result.pending is None:
            raise ValueError(f"commit of {client!r}: expected a result with a pending state, found none")
        self._store.put(client, result.pending)
        return TrainResult(samples=result.samples, metrics=result.metrics)

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

    def validate(self, *, client: str, tasks: Sequence[str], round: int, device: str) -> dict[str, ValResult]:
        """Score ``client``'s model on each task's held-out split, by task.

        A client that never trained is scored with the current global model, and stays unstored.
        """
        dev = torch.device(device)
        stored = self._store.get(client)
        model = self._model(dev)
        model.load_state_dict(self._server.state if stored is None else stored.model)
        results = {}
        for task in tasks:
            samples, metrics = self._tasks.score(model, client, task, dev)
            results[task] = ValResult(samples=samples, metrics=metrics)
        return results

    def aggregate(self, *, round: int, clients: Sequence[str]) -> AggregateResult:
        """Combine ``round``'s uploads from ``clients`` into the server's new state."""
        return self._server.aggregate(round, clients)

    def server_state(self) -> dict[str, torch.Tensor]:
        """Give the global model state (its tensors are never changed in place)."""
        return self._server.state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the server's state and every client state that exists.

        Taken at a round boundary, when no upload is pending. Tensors, numbers, strings, lists and dicts
        only, so it loads with ``torch.load(..., weights_only=True)``.
        """
        return {"server": self._server.state_dict(), "clients": self._store.export()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``state_dict()``: the server's state and the client states are replaced."""
        self._server.load_state(state["server"])
        self._store.replace_all(dict(state["clients"]))

    def _model(self, device: torch.device) -> nn.Module:
        models = self._models.__dict__.setdefault("by_device", {})
        if device not in models:
            models[device] = self._tasks.empty_model(self._model_opts, device)
        return models[device]

    def _optimizer_for(
        self, model: nn.Module, previous: ClientState | None
    ) -> tuple[torch.optim.Optimizer, LRScheduler | None]:
        optimizer = build_optimizer(self._optimizer_opts, [p for p in model.parameters() if p.requires_grad])
        scheduler = build_scheduler(self._scheduler_opts, optimizer)
        if previous is not None:
            # Cloned on the CPU: the optimizer updates its state in place (Adam's step counter stays on the CPU
            # and is not copied by load_state_dict), and the stored state must not change.
            optimizer.load_state_dict(_to_cpu(previous.optimizer, clone=True))
            if scheduler is not None and previous.scheduler is not None:
                scheduler.load_state_dict(copy.deepcopy(previous.scheduler))
        return optimizer, scheduler

    def _initial_model(self) -> nn.Module:
        model = self._tasks.build_model(self._model_opts, generator(self._seed, "init"))
        # Building the optimizer and scheduler once reports a bad option now, not in the first round.
        build_scheduler(self._scheduler_opts, build_optimizer(self._optimizer_opts, model.parameters()))
        return model


def build_loss(opts: Any, num_classes: int | None) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss ``criterion_opts`` names, called as ``(logits, features, targets)``.

    A single ``cross_entropy`` uses torch's fused loss; a list (e.g. cross-entropy plus triplet) is a
    weighted sum of ReID losses.
    """
    if isinstance(opts, Mapping) and opts.get("name") == "cross_entropy" and opts.get("weight", 1.0) == 1.0:
        ce = build_criterion(opts)
        return lambda logits, features, targets: ce(logits, targets)
    return build_reid_criterion(opts, num_classes=num_classes)


def _output(out: Any) -> ModelOutput:
    """A model's training output as logits and features (a one-output model's logits are its features)."""
    if isinstance(out, tuple):
        return ModelOutput(out[0], out[1])
    return ModelOutput(out, out)


def _snapshot(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    previous: ClientState | None,
    samples: int,
    memory: dict[str, Any],
    task: str,
) -> ClientState:
    return ClientState(
        memory=memory,
        task=task,
        # A copy even on the CPU: the thread's model trains on, the stored state must not change.
        model=_to_cpu(model.state_dict(), clone=True),
        # The optimizer is thrown away after this call, so its tensors need no copy.
        optimizer=_to_cpu(optimizer.state_dict(), clone=False),
        scheduler=None if scheduler is None else scheduler.state_dict(),
        rounds_trained=(0 if previous is None else previous.rounds_trained) + 1,
        samples=samples,
    )


def _to_cpu(value: Any, *, clone: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=clone)
    if isinstance(value, dict):
        return {k: _to_cpu(v, clone=clone) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v, clone=clone) for v in value]
    return value
