"""A user's data set, named ``task_opts.dataset: "package.module:Name"``, as a task source.

The class declares its ``task_opts.dataset_opts`` in ``defaults`` and is built once per process as
``Name(seed=..., clients=..., tasks=..., datasets_dir=..., **options)``: the experiment's seed, every client
name and every task name in config order, and ``datasets_dir`` (None when not set). The object then gives

    input_shape, num_classes     the shape of one sample and the number of classes (attributes)
    train(client, task)          the client's training samples of the task: float ``[N, *input_shape]``
                                 and int64 labels ``[N]``
    test(client, task)           its held-out samples of the task, in the same form
    global_test(task)            optional: the server's test samples of the task, for the global model
                                 (``exp_opts.val_model: global`` or ``both`` need it)

Models are built for it like for the built-in data sets (mlp, cnn or a user's model); ``val_acc`` and
``val_loss`` score it. The answers are checked, so a wrong shape or label is one line naming the call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..models import MODELS, build_model, empty_model, fits_small
from ..registry import load_target
from ..training import evaluate
from .source import client_names

__all__ = ["RESERVED", "UserTasks", "build_user_tasks", "not_a_dataset", "class_shape"]

#: What fedevents gives a user data set's constructor; an option of that name would hide it.
RESERVED = ("seed", "clients", "tasks", "datasets_dir")
_SCORE_BATCH = 1024


def not_a_dataset(obj: Any) -> str | None:
    """Why ``obj`` cannot be a user data set (the catalogue's check), or None."""
    if not isinstance(obj, type) or not all(callable(getattr(obj, m, None)) for m in ("train", "test")):
        return "a class with train(client, task) and test(client, task) methods"
    taken = [key for key in RESERVED if key in (getattr(obj, "defaults", None) or {})]
    if taken:
        return f"a data set whose defaults leave out {', '.join(RESERVED)} (fedevents gives them)"
    return None


def class_shape(name: str) -> tuple[tuple[int, ...], int] | None:
    """The ``(input_shape, num_classes)`` the class ``name`` declares as class attributes, or None: then the
    model can be checked only once the data set is built."""
    cls = load_target(name)
    shape, classes = getattr(cls, "input_shape", None), getattr(cls, "num_classes", None)
    if _shape_problem(shape) or _classes_problem(classes):
        return None
    return tuple(shape), int(classes)


class UserTasks:
    """A user's data set as the task source the Federation and the workers ask."""

    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    def __init__(self, source: Any, name: str) -> None:
        self.source, self.name = source, name
        shape, classes = getattr(source, "input_shape", None), getattr(source, "num_classes", None)
        problem = _shape_problem(shape) or _classes_problem(classes)
        if problem:
            raise ValueError(f"task_opts.dataset {name}: expected {problem}")
        self.input_shape, self.num_classes = tuple(int(s) for s in shape), int(classes)

    def build_model(self, model_opts: Mapping[str, Any], generator: torch.Generator) -> nn.Module:
        if not fits_small(model_opts.get("name")):
            raise ValueError(f"model_opts.name: expected one of {', '.join(MODELS)} or a user model for "
                             f"task_opts.dataset {self.name}, found {model_opts.get('name')!r}")
        return build_model(model_opts, self.input_shape, self.num_classes, generator=generator)

    def empty_model(self, model_opts: Mapping[str, Any], device: torch.device) -> nn.Module:
        return empty_model(model_opts, self.input_shape, self.num_classes, device=device)

    def train_data(self, client: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._samples("train", client, task)

    def train_inputs(self, client: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_data(client, task)

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of ``train_inputs`` as the model takes it: as is, the samples are model input already."""
        return batch

    def score(self, model: nn.Module, client: str, task: str, device: torch.device) -> tuple[int, dict[str, float]]:
        return _score(model, *self._samples("test", client, task), device)

    def score_global(self, model: nn.Module, task: str, device: torch.device) -> tuple[int, dict[str, float]]:
        return _score(model, *self._samples("global_test", task), device)

    def _samples(self, method: str, *args: str) -> tuple[torch.Tensor, torch.Tensor]:
        call = f"{self.name}.{method}({', '.join(repr(a) for a in args)})"
        got = getattr(self.source, method)(*args)
        if not (isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
            raise ValueError(f"task_opts.dataset: expected {call} to give (samples, labels) tensors, found "
                             f"{type(got).__name__}")
        x, y = got
        if not x.is_floating_point() or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"task_opts.dataset: expected {call} to give float samples of shape "
                             f"[N, {', '.join(map(str, self.input_shape))}], found {x.dtype} {list(x.shape)}")
        if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
            raise ValueError(f"task_opts.dataset: expected {call} to give {x.shape[0]} int64 labels, found "
                             f"{y.dtype} {list(y.shape)}")
        if y.numel() and not (0 <= int(y.min()) and int(y.max()) < self.num_classes):
            raise ValueError(f"task_opts.dataset: expected {call} to give labels 0-{self.num_classes - 1}, found "
                             f"{int(y.min())}-{int(y.max())}")
        return x, y


def build_user_tasks(config: Mapping[str, Any], seed: int) -> UserTasks:
    """The task source of the user data set ``task_opts.dataset`` names, built with its ``dataset_opts``."""
    opts = config["task_opts"]
    name = opts["dataset"]
    cls = load_target(name)
    problem = not_a_dataset(cls)
    if problem:
        raise ValueError(f"task_opts.dataset: expected {problem}, found {name}")
    if config["exp_opts"].get("val_model", "local") != "local" and not callable(getattr(cls, "global_test", None)):
        raise ValueError(f"task_opts.dataset: expected {name} to define global_test(task) for exp_opts.val_model "
                         f"{config['exp_opts']['val_model']}, found none")
    root = config.get("datasets_dir")
    given = {"seed": seed, "clients": tuple(client_names(config["clients"])), "tasks": _tasks(config["clients"]),
             "datasets_dir": Path(root) if root is not None else None}
    try:
        source = cls(**given, **dict(opts.get("dataset_opts") or {}))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"task_opts.dataset: expected {name}(seed=..., clients=..., tasks=..., datasets_dir=..., "
                         f"...) to build a data set, found {type(exc).__name__}: {first}") from None
    return UserTasks(source, name)


def _tasks(clients: Any) -> tuple[str, ...]:
    named = clients["tasks"] if isinstance(clients, Mapping) else [t for c in clients for t in c["tasks"]]
    return tuple(dict.fromkeys(named))


def _shape_problem(shape: Any) -> str | None:
    if isinstance(shape, Sequence) and not isinstance(shape, str) and shape and all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        return None
    return f"input_shape to be the shape of one sample (positive ints), found {shape!r}"


def _classes_problem(classes: Any) -> str | None:
    if isinstance(classes, int) and not isinstance(classes, bool) and classes >= 2:
        return None
    return f"num_classes to be a whole number >= 2, found {classes!r}"


def _score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[int, dict[str, float]]:
    """Accuracy and mean loss over ``x`` in chunks, so a large test set never sits on a device whole."""
    loss = correct = 0.0
    for xb, yb in zip(x.split(_SCORE_BATCH), y.split(_SCORE_BATCH)):
        scores = evaluate(model, xb.to(device), yb.to(device))
        loss += scores.loss * scores.samples
        correct += scores.acc * scores.samples
    count = int(y.shape[0])
    if count == 0:
        raise ValueError("task_opts.dataset: expected held-out samples to score, found none")
    return count, {"val_acc": correct / count, "val_loss": loss / count}
