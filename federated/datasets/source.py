"""``ImageTasks``: a task source over an image data set, its partition over the clients and its class split.

It offers what the Federation asks of any task source (``build_model``, ``empty_model``,
``train_data(client, task)``, ``score(model, client, task, device)``, ``augment``). The training set is
partitioned once over every client; a client's data of a task is its share restricted to the task's classes,
so no sample is seen by two clients. Images stay uint8 in memory and become normalised floats (per-channel
mean and standard deviation of the training set) only for the slice a client trains on or a batch scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..models import MODELS, build_model, empty_model, fits_small
from ..partition import matching, partition
from ..training import evaluate
from .base import ImageData, ImageSet
from .registry import read_dataset
from .streams import class_incremental, in_classes, single_task

__all__ = ["ImageOpts", "ImageTasks", "build_image_tasks", "client_names"]

_TEST_MODES = ("pooled", "client")
_SCORE_BATCH = 1024
_KEYS = ("partition", "classes_per_task", "task_names", "test", "test_fraction")


@dataclass(frozen=True, slots=True)
class ImageOpts:
    """``task_opts.image``: how the data set is partitioned, split into tasks and held out."""

    partition: Mapping[str, Any]
    classes_per_task: int | None = None
    task_names: tuple[str, ...] | None = None
    test: str = "pooled"
    test_fraction: float = 0.2

    @classmethod
    def from_dict(cls, opts: Mapping[str, Any] | None, *, where: str = "task_opts.image") -> ImageOpts:
        """Check ``opts`` (missing keys take their defaults: IID, one task, a pooled test set)."""
        opts = dict(opts or {})
        for key in opts:
            if key not in _KEYS:
                raise ValueError(f"{where}.{key}: expected one of {', '.join(_KEYS)}, found {key!r}")
        part = opts.get("partition", {"name": "iid"})
        if not isinstance(part, Mapping) or "name" not in part:
            raise ValueError(f"{where}.partition: expected a mapping with a name (and its options), found {part!r}")
        test = opts.get("test", "pooled")
        if test not in _TEST_MODES:
            raise ValueError(f"{where}.test: expected one of {', '.join(_TEST_MODES)}, found {test!r}")
        names = opts.get("task_names")
        if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"{where}.task_names: expected a list of names, found {names!r}")
        fraction = opts.get("test_fraction", 0.2)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
            raise ValueError(f"{where}.test_fraction: expected a number between 0 and 1, found {fraction!r}")
        return cls(partition=dict(part), classes_per_task=opts.get("classes_per_task"),
                   task_names=tuple(names) if names is not None else None, test=test,
                   test_fraction=float(fraction))


class ImageTasks:
    """A partitioned image data set as a task source; every client name indexes one share of the partition."""

    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    def __init__(self, data: ImageData, opts: ImageOpts, clients: Sequence[str], seed: int,
                 tasks: Sequence[str] = ()) -> None:
        self.data, self.opts = data, opts
        self.clients = {name: i for i, name in enumerate(clients)}
        if opts.classes_per_task is not None:
            self.tasks = class_incremental(data.num_classes, opts.classes_per_task, opts.task_names)
        else:
            self.tasks = single_task(data.num_classes, tasks or opts.task_names or (data.name,))
        self.train_parts = _split(data.train, opts, len(self.clients), seed)
        self.test_parts = _test_parts(data, opts, self.train_parts, seed) if opts.test == "client" else None
        self.mean, self.std = _channel_stats(data.train.images)

    def build_model(self, model_opts: Mapping[str, Any], generator: torch.Generator) -> nn.Module:
        _check_model(model_opts, self.data.name)
        return build_model(model_opts, self.data.input_shape, self.data.num_classes, generator=generator)

    def empty_model(self, model_opts: Mapping[str, Any], device: torch.device) -> nn.Module:
        return empty_model(model_opts, self.data.input_shape, self.data.num_classes, device=device)

    def train_data(self, client: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``client``'s training share of ``task``'s classes as normalised floats and labels, on the CPU."""
        index = self._select(self.data.train, self.train_parts[self._client(client)], task)
        if index.numel() == 0:
            raise ValueError(f"client {client!r}: expected training samples of task {task!r} (classes "
                             f"{_span(self.tasks[task])}), found none in its {self.opts.partition['name']} share")
        return self._floats(self.data.train.images[index]), self.data.train.labels[index]

    def train_inputs(self, client: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """What training batches are cut from: ``train_data`` (a client's share is small; ``augment`` is None)."""
        return self.train_data(client, task)

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of ``train_inputs`` as the model takes it: as is, the samples are model input already."""
        return batch

    def score(self, model: nn.Module, client: str, task: str, device: torch.device) -> tuple[int, dict[str, float]]:
        """Accuracy and mean cross-entropy on the held-out samples of ``task``'s classes (``val_acc``, ``val_loss``)."""
        part = self.test_parts[self._client(client)] if self.test_parts is not None else None
        index = self._select(self.data.test, part, task)
        if index.numel() == 0:
            raise ValueError(f"client {client!r}: expected held-out samples of task {task!r}, found none")
        return self._score(model, index, device)

    def score_global(self, model: nn.Module, task: str, device: torch.device) -> tuple[int, dict[str, float]]:
        """``score`` on the whole test set's samples of ``task``'s classes, whoever the clients: for a global model."""
        return self._score(model, self._select(self.data.test, None, task), device)

    def _score(self, model: nn.Module, index: torch.Tensor, device: torch.device) -> tuple[int, dict[str, float]]:
        loss = correct = 0.0
        for chunk in index.split(_SCORE_BATCH):
            x = self._floats(self.data.test.images[chunk]).to(device)
            scores = evaluate(model, x, self.data.test.labels[chunk].to(device))
            loss += scores.loss * scores.samples
            correct += scores.acc * scores.samples
        count = int(index.numel())
        return count, {"val_acc": correct / count, "val_loss": loss / count}

    def _select(self, split: ImageSet, part: torch.Tensor | None, task: str) -> torch.Tensor:
        if task not in self.tasks:
            raise ValueError(f"task {task!r}: expected one of {', '.join(self.tasks)} for {self.data.name}, found "
                             f"{task!r}")
        base = part if part is not None else torch.arange(len(split))
        return base[in_classes(split.labels[base], self.tasks[task])]

    def _client(self, client: str) -> int:
        if client not in self.clients:
            raise ValueError(f"client {client!r}: expected one of the {len(self.clients)} clients the data was "
                             f"partitioned over, found an unknown name")
        return self.clients[client]

    def _floats(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().div_(255.0) - self.mean) / self.std


def build_image_tasks(config: Mapping[str, Any], seed: int) -> ImageTasks:
    """The task source for ``task_opts.dataset`` one of ``IMAGE_DATASETS``, read from ``datasets_dir``."""
    task_opts = config["task_opts"]
    opts = ImageOpts.from_dict(task_opts.get("image"))
    data = read_dataset(task_opts["dataset"], config.get("datasets_dir"), seed=seed, test_fraction=opts.test_fraction)
    return ImageTasks(data, opts, client_names(config["clients"]), seed, _task_names(config["clients"]))


def client_names(clients: Any) -> list[str]:
    """Every client name of a clients list, or of the compact ``{count, prefix, tasks}`` form, in order."""
    if isinstance(clients, Mapping):
        count, prefix = clients["count"], clients.get("prefix", "client-")
        width = len(str(count - 1))
        return [f"{prefix}{i:0{width}d}" for i in range(count)]
    return [client["client_name"] for client in clients]


def _task_names(clients: Any) -> list[str]:
    named = clients["tasks"] if isinstance(clients, Mapping) else [t for c in clients for t in c["tasks"]]
    return list(dict.fromkeys(named))


def _split(split: ImageSet, opts: ImageOpts, num_clients: int, seed: int) -> list[torch.Tensor]:
    options = {k: v for k, v in opts.partition.items() if k != "name"}
    parts = partition(opts.partition["name"], split.labels.tolist(), num_clients, seed, options,
                      writers=split.writers, where="task_opts.image.partition")
    return [torch.as_tensor(p, dtype=torch.long) for p in parts]


def _test_parts(data: ImageData, opts: ImageOpts, train_parts: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    if opts.partition["name"] == "natural":
        return _by_train_writer(data, train_parts)
    parts = matching(data.train.labels.tolist(), [p.tolist() for p in train_parts], data.test.labels.tolist(), seed)
    return [torch.as_tensor(p, dtype=torch.long) for p in parts]


def _by_train_writer(data: ImageData, train_parts: list[torch.Tensor]) -> list[torch.Tensor]:
    # LEAF splits each writer's samples into train and test: a writer's test samples go to the client that
    # trains on that writer, and those of a writer no client trains on go to nobody.
    owner = {data.train.writers[i]: client for client, part in enumerate(train_parts) for i in part.tolist()}
    parts: list[list[int]] = [[] for _ in train_parts]
    for index, writer in enumerate(data.test.writers or ()):
        if writer in owner:
            parts[owner[writer]].append(index)
    return [torch.as_tensor(p, dtype=torch.long) for p in parts]


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A histogram of the 256 byte values per channel gives the exact mean and variance without a float copy
    # of the images (600 MB for CIFAR-10's training set) and in a tenth of the time.
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for channel in images.unbind(1):
        counts = torch.bincount(channel.reshape(-1), minlength=256).double()
        m = (counts * values).sum() / counts.sum()
        mean.append(m)
        std.append(((counts * (values - m).square()).sum() / counts.sum()).sqrt())
    shape = (1, images.shape[1], 1, 1)
    return torch.stack(mean).float().reshape(shape), torch.stack(std).float().clamp_min(1e-3).reshape(shape)


def _check_model(model_opts: Mapping[str, Any], dataset: str) -> None:
    if not fits_small(model_opts.get("name")):
        raise ValueError(f"model_opts.name: expected one of {', '.join(MODELS)} for task_opts.dataset {dataset}, "
                         f"found {model_opts.get('name')!r}")


def _span(classes: Sequence[int]) -> str:
    return f"{classes[0]}-{classes[-1]}" if len(classes) > 1 else str(classes[0])
