"""Task sources: where a client's training data comes from, which model fits it, and how it is scored.

``synthetic`` generates a classification task per task name (no files); scores are ``val_acc`` and
``val_loss``. ``reid`` reads the FedSTIL layout ``<datasets_dir>/<task>/{train,query,gallery}/<id>/``;
scores are CMC rank-1/3/5/10 and mAP as ``val_rank_k`` and ``val_map``. Training labels of a ReID task are
its identities numbered after those of every task before it (tasks in name order), so identities of
different data sets never share a classifier row. A user's data set (``"package.module:Name"``) is
wrapped by ``datasets.user``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .datasets import IMAGE_DATASETS, build_image_tasks
from .datasets.user import build_user_tasks, not_a_dataset
from .backbones import REID_MODELS, build_reid_model, empty_reid_model
from .models import MODELS, build_model, empty_model, fits_small
from .reid_data import IMAGE_CACHE, AugmentOpts, ImageDecoder, LoaderOpts, augment, load_image_set, load_reid_task
from .precision import as_float32
from .registry import Catalogue, Component, is_target
from .reid_metrics import reid_scores
from .synthetic import SyntheticSpec, client_data, global_test_data
from .training import evaluate

__all__ = ["TaskSource", "SyntheticTasks", "ReidTasks", "build_task_source", "DATASETS", "CATALOGUE"]

#: Data sets by name, tagged with the kind of model that fits them (models.CATALOGUE tags its models: the
#: small mlp/cnn, or the ReID backbones).
DATASET_TAGS = {"reid": frozenset({"reid"}), "synthetic": frozenset({"small"}),
                **{name: frozenset({"small"}) for name in IMAGE_DATASETS}}
DATASETS = tuple(sorted(DATASET_TAGS))
#: ``task_opts.dataset``: the built-in task sources, and a user's data set class as "package.module:Name"
#: (datasets/user.py says what it gives), which fits the models mlp and cnn fit.
CATALOGUE = Catalogue("datasets", lambda: {n: Component(n, tags=t) for n, t in DATASET_TAGS.items()},
                      not_a_dataset, user_tags=frozenset({"small"}))


class TaskSource:
    """What the Federation asks of a data set."""

    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    def build_model(self, model_opts: Mapping[str, Any], generator: torch.Generator) -> nn.Module:
        raise NotImplementedError

    def empty_model(self, model_opts: Mapping[str, Any], device: torch.device) -> nn.Module:
        raise NotImplementedError

    def train_data(self, client: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The training samples and labels of ``client`` on ``task``, on the CPU, as the model takes them."""
        raise NotImplementedError

    def train_inputs(self, client: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The training samples in their stored form, which ``augment`` turns into model input a batch at a time.

        The same as ``train_data`` unless a source keeps its samples more compactly than the model takes them.
        """
        return self.train_data(client, task)

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of ``train_inputs``' samples as the model takes them, without augmentation.

        As is here; a source whose ``train_inputs`` differ from ``train_data`` overrides it, so that a batch
        of ``train_inputs`` comes out exactly as the same rows of ``train_data``.
        """
        return batch

    def score(self, model: nn.Module, client: str, task: str, device: torch.device) -> tuple[int, dict[str, float]]:
        """How many samples were scored and the validation metrics of ``model`` on ``task``."""
        raise NotImplementedError

    def score_global(self, model: nn.Module, task: str, device: torch.device) -> tuple[int, dict[str, float]]:
        """Like ``score``, on the server's test set of ``task`` (the global model's evaluation)."""
        raise NotImplementedError


class SyntheticTasks(TaskSource):
    """The built-in synthetic classification task; each client owns a non-IID slice of every task."""

    def __init__(self, opts: Mapping[str, Any], seed: int) -> None:
        self.spec = SyntheticSpec.from_dict(opts["synthetic"])
        self.global_size = int(opts["synthetic"].get("global_test_size", 1000))
        self.seed = seed

    def _check(self, model_opts: Mapping[str, Any]) -> None:
        if not fits_small(model_opts["name"]):
            raise ValueError(f"model_opts.name: expected one of {', '.join(MODELS)} for task_opts.dataset "
                             f"synthetic, found {model_opts['name']!r}")

    def build_model(self, model_opts: Mapping[str, Any], generator: torch.Generator) -> nn.Module:
        self._check(model_opts)
        return build_model(model_opts, self.spec.input_shape, self.spec.num_classes, generator=generator)

    def empty_model(self, model_opts: Mapping[str, Any], device: torch.device) -> nn.Module:
        return empty_model(model_opts, self.spec.input_shape, self.spec.num_classes, device=device)

    def train_data(self, client: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = client_data(self.spec, seed=self.seed, task=task, client=client)
        return data.x_train, data.y_train

    def score(self, model: nn.Module, client: str, task: str, device: torch.device) -> tuple[int, dict[str, float]]:
        data = client_data(self.spec, seed=self.seed, task=task, client=client)
        scores = evaluate(model, data.x_test.to(device), data.y_test.to(device))
        return scores.samples, {"val_acc": scores.acc, "val_loss": scores.loss}

    def score_global(self, model: nn.Module, task: str, device: torch.device) -> tuple[int, dict[str, float]]:
        x, y = global_test_data(self.spec, seed=self.seed, task=task, size=self.global_size)
        scores = evaluate(model, x.to(device), y.to(device))
        return scores.samples, {"val_acc": scores.acc, "val_loss": scores.loss}


class ReidTasks(TaskSource):
    """Person re-identification tasks read from disk, each decoded once and cached."""

    def __init__(self, opts: Mapping[str, Any], datasets_dir: str, tasks: Sequence[str], num_classes: int,
                 *, legacy: bool = False) -> None:
        #: exp_opts.legacy: score as FedSTIL's runner did (see ``_features`` and ``score``).
        self.legacy = legacy
        self.augment_opts = AugmentOpts.from_dict(opts["augment_opts"])
        # Read defensively: configs from before task_opts.loader_opts existed have no such key.
        self.decoder = ImageDecoder(LoaderOpts.from_dict(opts.get("loader_opts") or {}))
        # "standard" is the Market-1501 mAP over every correct match; reid_metrics calls it "true".
        # The config loader resolves an unset mode; a config built by hand may leave it None.
        mode = opts.get("map_mode") or ("fedstil-runner" if legacy else "standard")
        self.map_mode = "true" if mode == "standard" else mode
        self.tasks = {name: load_reid_task(datasets_dir, name) for name in sorted(set(tasks))}
        self.offsets: dict[str, int] = {}
        total = 0
        for name, task in self.tasks.items():
            self.offsets[name] = total
            total += task.num_ids
        if total > num_classes:
            raise ValueError(f"model_opts.num_classes = {num_classes}, but the tasks under {datasets_dir} have "
                             f"{total} training identities; expected at least {total}")
        self.augment = self._prepare

    def _check(self, model_opts: Mapping[str, Any]) -> None:
        if model_opts["name"] not in REID_MODELS:
            raise ValueError(f"model_opts.name: expected one of {', '.join(REID_MODELS)} for task_opts.dataset "
                             f"reid, found {model_opts['name']!r}")

    def build_model(self, model_opts: Mapping[str, Any], generator: torch.Generator) -> nn.Module:
        self._check(model_opts)
        return build_reid_model(model_opts, generator=generator)

    def empty_model(self, model_opts: Mapping[str, Any], device: torch.device) -> nn.Module:
        return empty_reid_model(model_opts, device=device)

    def train_data(self, client: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        # A float copy of the whole split (four times the bytes of the 8-bit one), for methods that take model
        # input; the built-in ones read train_inputs and normalise a batch at a time with model_input.
        pixels, labels = self.train_inputs(client, task)
        return self.augment_opts.normalise(pixels), labels

    def train_inputs(self, client: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = load_image_set(self.tasks[task], "train", self.augment_opts, cache=IMAGE_CACHE, decoder=self.decoder)
        return images.pixels, images.labels + self.offsets[task]

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalise a batch of stored 8-bit images; a float batch is model input already."""
        return self.augment_opts.normalise(batch) if batch.dtype == torch.uint8 else batch

    def _prepare(self, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A batch of stored images as model input (``model_input``), augmented."""
        batch = self.model_input(batch)
        level = self.augment_opts.level
        return batch if level == "none" else augment(batch, level, generator=gen)

    def score(self, model: nn.Module, client: str, task: str, device: torch.device) -> tuple[int, dict[str, float]]:
        query = load_image_set(self.tasks[task], "query", self.augment_opts, cache=IMAGE_CACHE, decoder=self.decoder)
        gallery = load_image_set(self.tasks[task], "gallery", self.augment_opts, cache=IMAGE_CACHE, decoder=self.decoder)
        q, g = self._features(model, query.pixels, device), self._features(model, gallery.pixels, device)
        qc, gc = torch.as_tensor(query.camids), torch.as_tensor(gallery.camids)
        if self.legacy:
            # The runner passed no cameras (a same-camera match counted as a hit) and ranked by cosine.
            qc, gc = torch.full_like(qc, -1), torch.full_like(gc, -1)
        scores = reid_scores(q, query.pids, qc, g, gallery.pids, gc, map_mode=self.map_mode,
                             metric="cosine" if self.legacy else "euclidean")
        metrics = {f"val_{key}": value for key, value in scores.items()}
        return len(query), metrics

    def _features(self, model: nn.Module, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The retrieval features of ``pixels``: the eval-mode embedding, or under legacy the runner's pooled
        feature before the neck (the neck's input)."""
        caught: list[torch.Tensor] = []
        neck = getattr(model, "bottleneck", None) if self.legacy else None
        # Caught inside the forward pass, so in bfloat16 under exp_opts.precision bf16 (only what the forward
        # gives back is cast to float32 for the caller).
        handle = None if neck is None else neck.register_forward_pre_hook(
            lambda _, args: caught.append(as_float32(args[0])))
        model.eval()
        try:
            with torch.inference_mode():
                out = [model(self.augment_opts.normalise(b.to(device))) for b in pixels.split(256)]
        finally:
            if handle is not None:
                handle.remove()
        return torch.cat(caught if handle is not None else out)

    def score_global(self, model: nn.Module, task: str, device: torch.device) -> tuple[int, dict[str, float]]:
        # A ReID task's query and gallery are the task's, not a client's: the server scores on the same ones.
        return self.score(model, "", task, device)


def build_task_source(config: Mapping[str, Any], seed: int) -> TaskSource:
    """The task source ``task_opts.dataset`` names, over every task the clients will learn."""
    opts = config["task_opts"]
    if is_target(str(opts["dataset"])):
        return build_user_tasks(config, seed)
    if opts["dataset"] == "synthetic":
        return SyntheticTasks(opts, seed)
    if opts["dataset"] in IMAGE_DATASETS:
        return build_image_tasks(config, seed)
    if opts["dataset"] == "reid":
        if not config.get("datasets_dir"):
            raise ValueError("datasets_dir: expected the folder of the ReID tasks for task_opts.dataset reid, found none")
        num_classes = config["model_opts"].get("num_classes")
        if not num_classes:
            raise ValueError("model_opts.num_classes: expected the number of training identities for a ReID model, found none")
        return ReidTasks(opts, config["datasets_dir"], all_tasks(config["clients"]), num_classes,
                         legacy=bool(config.get("exp_opts", {}).get("legacy")))
    raise ValueError(f"task_opts.dataset: expected one of {', '.join(DATASETS)}, found {opts['dataset']!r}")


def all_tasks(clients: Any) -> list[str]:
    """Every task named by a clients list or by the compact ``{count, tasks}`` form."""
    if isinstance(clients, Mapping):
        return list(clients["tasks"])
    return [task for client in clients for task in client["tasks"]]
