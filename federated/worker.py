"""The client half of a federation: what an executor runs, in a thread, a worker process or a Ray actor.

A ``Worker`` is built from the experiment's config and seed alone, so any process can build an identical
one. It answers jobs: a ``TrainJob`` carries everything one client's local round needs (the server's payload
for it, its stored state, the seed), a ``ValJob`` the model to score. Results carry the new client state and
the metrics; nothing is kept between jobs but caches (decoded data, one built model per device and thread).
Jobs and results hold CPU tensors, numbers and strings only, so they pickle to any process.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .allocator import release_free_pages, share_one_heap
from .criteria import build_reid_criterion
from .methods import LocalRound, Method, ModelOutput, build_method
from .precision import forward_precision, precision_call
from .seeds import generator
from .store import ClientState, state_nbytes
from .tasks import TaskSource, build_task_source
from .training import build_criterion, build_optimizer, build_scheduler, direct_call, train_local

__all__ = ["TrainJob", "TrainOutcome", "ValJob", "ValResult", "Worker", "build_loss", "to_cpu"]

#: FedSTIL's runner's hard-coded early-stop threshold (``early_stop_threshold=3``), used under exp_opts.legacy.
RUNNER_PATIENCE = 3


@dataclass(frozen=True, slots=True)
class TrainJob:
    """One client's local round: who, on what, where, from which payload and stored state."""

    client: str
    task: str
    round: int
    device: str
    seed: int
    #: What the server sends this client this round (the method's payload).
    payload: Mapping[str, Any]
    #: The client's stored state, or None for a client that never trained.
    previous: ClientState | None


@dataclass(frozen=True, slots=True)
class TrainOutcome:
    """What a local round produced: the samples trained on, ``tr_acc`` / ``tr_loss`` and the new state."""

    samples: int
    metrics: dict[str, float]
    state: ClientState


@dataclass(frozen=True, slots=True)
class ValJob:
    """Score one model on each of ``tasks``' held-out splits: a client's (its own test data) or, with
    ``client`` None, the global model (the server's test data)."""

    client: str | None
    tasks: tuple[str, ...]
    round: int
    device: str
    model: Mapping[str, torch.Tensor]
    #: A model per task, scoring each task with its own (FedSTIL's per-task checkpoints); None: ``model``.
    models: Mapping[str, Mapping[str, torch.Tensor]] | None = None


@dataclass(frozen=True, slots=True)
class ValResult:
    """One client's score on one task's held-out split: ``val_acc`` / ``val_loss`` (ReID: rank-k, mAP)."""

    samples: int
    metrics: dict[str, float]


class Worker:
    """Runs train and validation jobs for one experiment; safe to call from several threads at once."""

    def __init__(self, config: Mapping[str, Any], seed: int, *, tasks: TaskSource | None = None) -> None:
        share_one_heap()  # a worker process's first: its models and training come next
        task_opts = config["task_opts"]
        self._method = build_method(config["exp_method"], config.get("method_opts") or {}, seed=seed,
                                    legacy=bool((config.get("exp_opts") or {}).get("legacy")))
        self._tasks = tasks if tasks is not None else build_task_source(config, seed)
        self._epochs = int(task_opts["train_epochs"])
        self._batch_size = int(task_opts["batch_size"])
        self._model_opts = dict(config["model_opts"])
        self._optimizer_opts = dict(config["optimizer_opts"])
        # False: FedSTIL's rule, each round starts with a fresh optimizer (no moments, the configured lr).
        self._keep_state = bool(self._optimizer_opts.get("keep_state", True))
        self._scheduler_opts = dict(config["scheduler_opts"])
        self._criterion = build_loss(config["criterion_opts"], self._model_opts.get("num_classes"))
        #: fp32, or bf16: the model's forward passes in bfloat16 during training and validation.
        self._precision = str((config.get("exp_opts") or {}).get("precision", "fp32"))
        #: FedSTIL's runner's early stop (exp_opts.legacy): a round ends after 3 epochs without improvement.
        self._patience = RUNNER_PATIENCE if self._method.legacy else None
        # Building a model costs more than training a small one for a round, so each thread keeps one per
        # device and loads whatever weights a job needs into it.
        self._models = threading.local()
        # Before any job can run a forward pass.
        self._method.plan_network(lambda: self._tasks.empty_model(self._model_opts, torch.device("meta")))

    @property
    def tasks(self) -> Any:
        return self._tasks

    def warm_up(self) -> None:
        """Pay the one-off costs of a first job now: torch imports its compiler stack the first time an
        optimizer is built (seconds on a busy machine), which a fresh worker process would otherwise charge
        to its first client's time."""
        build_optimizer(self._optimizer_opts, [torch.zeros(1, requires_grad=True)])

    def train(self, job: TrainJob) -> TrainOutcome:
        """Run ``job``'s local round on its device; the new state comes back on the CPU."""
        outcome = self._train(job)
        release_free_pages(state_nbytes(outcome.state.model))  # the optimizer, moments and gradients are gone
        return outcome

    def _train(self, job: TrainJob) -> TrainOutcome:
        dev = torch.device(job.device)
        model = self.model(dev)
        with forward_precision(model, dev, self._precision):
            return self._local_round(job, dev, model)

    def _local_round(self, job: TrainJob, dev: torch.device, model: nn.Module) -> TrainOutcome:
        previous = job.previous
        forward = lambda xb: model_output(model(xb))  # noqa: E731
        rnd = LocalRound(
            client=job.client, task=job.task, round=job.round, device=dev, model=model,
            payload=job.payload,
            memory=dict(previous.memory) if previous is not None else {},
            previous_model=previous.model if previous is not None else None,
            previous_task=previous.task if previous is not None else None,
            task_data=lambda name: tuple(t.to(dev) for t in self._tasks.train_data(job.client, name)),
            forward=forward,
            augment=self._tasks.augment,
            task_inputs=lambda name: tuple(t.to(dev) for t in self._tasks.train_inputs(job.client, name)),
            model_input=self._tasks.model_input,
        )
        self._method.start(rnd)
        if type(self._method).training_data is Method.training_data:
            # Samples stay in their stored form (ReID: 8-bit pixels) until augment prepares each batch.
            x, y = rnd.task_inputs(job.task)
        elif self._method.stored_inputs:
            # A method that adds samples (exemplars) keeps them in the same stored form as the task's.
            x, y = self._method.training_data(rnd, *rnd.task_inputs(job.task))
        else:
            # A method written for model input mixes its samples with the task's in that form.
            x, y = self._method.training_data(rnd, *rnd.task_data(job.task))
        if rnd.forward is not forward:  # a method's own training forward runs in the run's precision too
            rnd.forward = precision_call(rnd.forward, dev, self._precision)
        optimizer, scheduler = self._optimizer_for(model, previous)

        def batch_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = rnd.forward(xb)
            base = self._criterion(out.logits, out.features, yb)
            return self._method.batch_loss(rnd, xb, yb, out, base), out.logits

        ids = (job.seed, job.round, job.client, job.task)
        scores = train_local(
            model, optimizer, scheduler, None, x, y, epochs=self._epochs, batch_size=self._batch_size,
            shuffle=generator(*ids, "shuffle"), batch_loss=batch_loss,
            augment=rnd.augment, augment_generator=generator(*ids, "augment"), patience=self._patience,
        )
        self._method.finish(rnd)
        samples = int(y.shape[0])
        kept = optimizer if self._keep_state else None
        # The upload's weight; under legacy the runner's train_cnt, samples times the epochs its early stop counted.
        weight = scores.samples if self._method.legacy else samples
        state = _snapshot(model, kept, scheduler, previous, weight, to_cpu(rnd.memory, clone=False), job.task)
        return TrainOutcome(samples=samples, metrics={"tr_acc": scores.acc, "tr_loss": scores.loss}, state=state)

    def validate(self, job: ValJob) -> dict[str, ValResult]:
        """Score ``job.model`` on each task of ``job``, by task."""
        results = self._validate(job)
        release_free_pages(state_nbytes(job.model))  # the features and activations are gone now
        return results

    def _validate(self, job: ValJob) -> dict[str, ValResult]:
        dev = torch.device(job.device)
        model = self.model(dev)
        with forward_precision(model, dev, self._precision):
            return self._scores(job, dev, model)

    def _scores(self, job: ValJob, dev: torch.device, model: nn.Module) -> dict[str, ValResult]:
        model.load_state_dict(job.model)
        results = {}
        for task in job.tasks:
            if job.models is not None:
                model.load_state_dict(job.models[task])
            if job.client is None:
                samples, metrics = self._tasks.score_global(model, task, dev)
            else:
                samples, metrics = self._tasks.score(model, job.client, task, dev)
            results[task] = ValResult(samples=samples, metrics=metrics)
        return results

    def model(self, device: torch.device) -> nn.Module:
        """This thread's model on ``device`` (built on first use; weights are whatever was loaded last)."""
        models = self._models.__dict__.setdefault("by_device", {})
        if device not in models:
            models[device] = self._method.prepare(self._tasks.empty_model(self._model_opts, device))
        return models[device]

    def _optimizer_for(
        self, model: nn.Module, previous: ClientState | None
    ) -> tuple[torch.optim.Optimizer, LRScheduler | None]:
        optimizer = build_optimizer(self._optimizer_opts, [p for p in model.parameters() if p.requires_grad])
        scheduler = build_scheduler(self._scheduler_opts, optimizer)
        if previous is not None and previous.optimizer:
            # Cloned on the CPU: the optimizer updates its state in place (Adam's step counter stays on the CPU
            # and is not copied by load_state_dict), and the stored state must not change.
            optimizer.load_state_dict(to_cpu(previous.optimizer, clone=True))
        if previous is not None and scheduler is not None and previous.scheduler is not None:
            # Without a kept optimizer the schedule still runs on while the lr starts where configured (FedSTIL).
            scheduler.load_state_dict(copy.deepcopy(previous.scheduler))
        if self._method.legacy:
            return optimizer, self._runner_schedule(optimizer, scheduler)
        return optimizer, scheduler

    def _runner_schedule(
        self, optimizer: torch.optim.Optimizer, scheduler: LRScheduler | None
    ) -> LRScheduler | None:
        """FedSTIL's runner's schedule: each round starts at the configured learning rate while the scheduler
        keeps counting the client's epochs (StepLR's decay then reaches only the epochs of a round after a
        multiple of ``step_size``); for methods whose optimizer it rebuilt every epoch, no schedule at all."""
        for group in optimizer.param_groups:
            group["lr"] = optimizer.defaults["lr"]
        return scheduler if self._method.runner_schedules_lr else None


def build_loss(opts: Any, num_classes: int | None) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss ``criterion_opts`` names, called as ``(logits, features, targets)``.

    A single ``cross_entropy`` uses torch's fused loss; a list (e.g. cross-entropy plus triplet) is a
    weighted sum of ReID losses.
    """
    if isinstance(opts, Mapping) and opts.get("name") == "cross_entropy" and opts.get("weight", 1.0) == 1.0:
        ce = direct_call(build_criterion(opts))
        return lambda logits, features, targets: ce(logits, targets)
    return build_reid_criterion(opts, num_classes=num_classes)


def model_output(out: Any) -> ModelOutput:
    """A model's training output as logits and features (a one-output model's logits are its features)."""
    if isinstance(out, tuple):
        return ModelOutput(out[0], out[1])
    return ModelOutput(out, out)


def _snapshot(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
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
        model=to_cpu(model.state_dict(), clone=True),
        # The optimizer is thrown away after this call, so its tensors need no copy; none is kept when the
        # next round starts afresh (optimizer_opts.keep_state: false).
        optimizer={} if optimizer is None else to_cpu(optimizer.state_dict(), clone=False),
        scheduler=None if scheduler is None else scheduler.state_dict(),
        rounds_trained=(0 if previous is None else previous.rounds_trained) + 1,
        samples=samples,
    )


def to_cpu(value: Any, *, clone: bool) -> Any:
    """``value`` with every tensor in it (nested dicts and lists) on the CPU, copied if ``clone``."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=clone)
    if isinstance(value, dict):
        return {k: to_cpu(v, clone=clone) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v, clone=clone) for v in value]
    return value

