"""The method contract: a federated (continual) method is a server half and a client half.

The ``Federation`` drives every method the same way, in a worker thread per client:

    both halves    prepare(model)                      the model the method trains (FedSTIL swaps layers)
    server half    payload(server, client, kind)       what the server sends a client this round
                   aggregate(server, uploads)          the new server state from this round's uploads
                   replaced_on_dispatch(server, ...)   stored model entries ``start`` overwrites unread
    client half    start(rnd)                          load the payload (or the client's own model)
                   training_data(rnd, x, y)            the samples to train on (e.g. plus exemplars)
                   batch_loss(rnd, xb, yb, out, loss)  the loss of one batch (e.g. plus a penalty)
                   finish(rnd)                         after local training (e.g. new importances)
                   upload(state)                       what the client sends back

``rnd.memory`` is the method's state for one client (importances, anchors, exemplars, …). It is stored
with the client between rounds and in checkpoints, so it may hold only tensors, numbers, strings, lists
and dicts; tensors in it are moved to the CPU after ``finish``. ``rnd.scratch`` lives for one round only.

A method that looks at a whole task (exemplars, importances) reads it with ``rnd.task_inputs`` in the form
the task source stores it (a ReID task's 8-bit pixels) and turns one batch at a time into model input with
``rnd.model_input``: normalising a batch gives the same numbers as normalising the split and slicing it, at a
quarter of the bytes. ``rnd.task_data`` gives the whole split as model input, for methods written for that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ..fedavg import Upload, weighted_mean
from ..predictions import Prediction

__all__ = ["LocalRound", "Method", "ModelOutput", "ServerState", "every_entry", "no_entry", "option"]


@dataclass(frozen=True)
class ModelOutput:
    """A training forward pass: ``logits`` for the classifier and ``features`` for metric losses."""

    logits: torch.Tensor
    features: torch.Tensor


@dataclass
class ServerState:
    """The server's state: the global model and whatever else a method keeps (e.g. summed importances)."""

    model: dict[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)
    #: The round being aggregated, as the ``Server`` hands the state to ``Method.aggregate`` (0 otherwise).
    round: int = 0


def as_is(batch: torch.Tensor) -> torch.Tensor:
    """``model_input`` of a source whose stored samples are the model's input already."""
    return batch


@dataclass
class LocalRound:
    """One client's local round as a method sees it, inside a worker thread."""

    client: str
    task: str
    round: int
    device: torch.device
    model: nn.Module
    payload: Mapping[str, Any]
    memory: dict[str, Any]
    previous_model: Mapping[str, torch.Tensor] | None
    previous_task: str | None
    task_data: Callable[[str], tuple[torch.Tensor, torch.Tensor]]
    #: The training forward pass over what ``training_data`` gives; a method that trains on something other
    #: than the task's inputs (FedSTIL's cached prototypes) replaces it in ``training_data``.
    forward: Callable[[torch.Tensor], ModelOutput]
    scratch: dict[str, Any] = field(default_factory=dict)
    #: The augmentation applied to each training batch; a method that trains on features sets it to None.
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    #: A task's training samples and labels on the device in their stored form (a ReID task's 8-bit pixels);
    #: None: the same as ``task_data``.
    task_inputs: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None
    #: A batch of stored samples as the model takes them, without augmentation (a ReID batch normalised).
    model_input: Callable[[torch.Tensor], torch.Tensor] = as_is

    def __post_init__(self) -> None:
        if self.task_inputs is None:
            self.task_inputs = self.task_data

    def forward_inputs(self, xb: torch.Tensor) -> ModelOutput:
        """The training forward pass of a batch of stored samples (``model_input``, then ``forward``)."""
        return self.forward(self.model_input(xb))


def no_entry(name: str) -> bool:
    """``replaced_on_dispatch``'s answer for a method whose dispatch may read every stored entry."""
    return False


def every_entry(name: str) -> bool:
    """``replaced_on_dispatch``'s answer for a method whose dispatch loads a whole model over the stored one."""
    return True


def option(options: Mapping[str, Any], key: str, default: float, *, method: str, minimum: float = 0.0) -> float:
    """A number from ``method_opts``, checked: a one-line ValueError names the key, the bound and the value."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ValueError(f"method_opts.{key}: expected a number >= {minimum:g} for {method}, found {value!r}")
    return float(value)


class Method:
    """FedAvg's behaviour; other methods override the hooks that differ."""

    name: ClassVar[str] = "fedavg"
    #: ``method_opts`` keys this method reads, with their defaults (documented in docs/methods.md).
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: Other names of those options (FedSTIL's ``model_opts`` keys) -> (option, factor the value is multiplied
    #: by), or None for a key FedSTIL files carry that has no effect; the config loader translates them.
    aliases: ClassVar[Mapping[str, tuple[str, float] | None]] = {}
    #: FedSTIL's checkpoint naming: True for a method that, for a client without ``model_ckpt_name``, keeps
    #: one model per task and validates each task with that task's model (baseline's ``mm`` form).
    models_per_task: ClassVar[bool] = False
    #: True when a client's validation scores depend on its stored state and the task alone (the worker
    #: scores the stored model, or models, with no draw): a client whose state has not changed may then keep
    #: its last scores (``exp_opts.val_reuse``). A method whose validation reads anything else, the server's
    #: state, its dispatch or the round, sets it False and every client is scored in every validation round.
    reusable_scores: ClassVar[bool] = True
    #: True when ``training_data`` takes the task's samples in their stored form (``rnd.task_inputs``, a ReID
    #: task's 8-bit pixels), so no float copy of the whole split is made; what it returns still goes through
    #: ``rnd.augment`` a batch at a time. False: it takes them as model input (``rnd.task_data``).
    stored_inputs: ClassVar[bool] = False

    #: The experiment's seed (``build_method`` sets it), for a method's own draws (FedWeIT's knowledge base).
    seed: int = 0
    #: ``exp_opts.legacy`` (``build_method`` sets it): reproduce FedSTIL's runner where a fix changed results.
    legacy: bool = False
    #: Whether FedSTIL's runner's learning-rate schedule reached this method's training: it rebuilt the
    #: optimizer's parameter groups every epoch for icarl, fedweit, fedstil and fedstil-atten, which undid
    #: every StepLR step (FEDSTIL.md section 3.1). Read under ``legacy`` only.
    runner_schedules_lr: ClassVar[bool] = True

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"method_opts.{unknown[0]}: not an option of {self.name} (its options: {known})")
        self.options = {**self.defaults, **options}

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model this method trains, made from a freshly built one (FedSTIL swaps layers); as is here."""
        return model

    def plan(self, model: nn.Module) -> None:
        """Look at the network once per worker, before its first job: ``model`` is ``prepare``'s model on
        the meta device (shapes, no values). For work that must not run beside a training in another thread,
        such as an FX trace (FedSTIL); nothing here."""

    def plan_network(self, build: Callable[[], nn.Module]) -> None:
        """``plan(prepare(build()))`` where this method's class has a ``plan`` of its own; otherwise nothing is
        built. Each worker calls it before its first job, and the config check calls it too, so a network
        the method cannot plan is refused before the run rather than failing its first job."""
        if type(self).plan is not Method.plan:
            self.plan(self.prepare(build()))

    # server half -------------------------------------------------------------------------------------
    def payload(self, server: ServerState, client: str, kind: str) -> dict[str, Any]:
        """What ``client`` starts from; ``kind`` is "integrated" (new client) or "incremental"."""
        return {"model": server.model}

    def aggregate(self, server: ServerState, uploads: Mapping[str, Upload]) -> ServerState:
        """The new server state: here the sample-weighted mean of this round's models."""
        return ServerState(weighted_mean(uploads), server.extras)

    def replaced_on_dispatch(self, server: ServerState, *, switching: bool) -> Callable[[str], bool]:
        """Which entries of a known client's stored model its next dispatch overwrites before anything
        reads them, by name (``switching``: that dispatch starts a task other than the stored state's).

        A checkpoint leaves those out until the client's next dispatch (for the clients the next round
        dispatches to, or for every client when no validation reads a client's model between its
        dispatches), and a resumed run fills them with the global model's tensor of the same name
        (docs/reliability.md). That dispatch may come many rounds after ``server``: name only entries it
        overwrites whatever later aggregations make of the server's state (an answer may grow with it, as
        FedWeIT's does once a knowledge base is drawn, never shrink). None here: a method says what its
        ``start`` replaces, so a user's method that reads its stored model stays safe.
        """
        return no_entry

    def server_predictions(self, server: ServerState) -> dict[tuple[str, ...], Prediction]:
        """Tensors of the server's state (by path: ``("model", name)``, ``("extras", ...)``) that others of it
        predict closely; a checkpoint stores each as its difference from the prediction. None here."""
        return {}

    def upgrade(self, model: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A model state that an earlier fedevents saved (a resumed checkpoint), in the form this method keeps
        now; the same here. FedSTIL drops the anchors it now rebuilds instead of storing."""
        return dict(model)

    # client half -------------------------------------------------------------------------------------
    def start(self, rnd: LocalRound) -> None:
        rnd.model.load_state_dict(rnd.payload["model"])

    def training_data(self, rnd: LocalRound, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def batch_loss(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor, out: ModelOutput,
                   loss: torch.Tensor) -> torch.Tensor:
        return loss

    def finish(self, rnd: LocalRound) -> None:
        pass

    def upload(self, model: Mapping[str, torch.Tensor], samples: int, memory: Mapping[str, Any]) -> Upload:
        return Upload(state=model, samples=samples)
