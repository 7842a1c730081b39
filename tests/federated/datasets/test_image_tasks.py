"""ImageTasks: a client's share of a task, its held-out data, its model, and a tiny FedAvg that learns."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from fedevents.federated.datasets import ImageOpts, ImageTasks, build_image_tasks, read_cifar10, read_mnist
from fedevents.federated.fedavg import Upload, weighted_mean
from fedevents.federated.seeds import generator
from fedevents.federated.tasks import TaskSource
from fedevents.federated.training import train_local

CLIENTS = [f"client-{i}" for i in range(4)]


def _split_mnist(root: Path, **image: Any) -> ImageTasks:
    opts = ImageOpts.from_dict({"classes_per_task": 2, **image})
    return ImageTasks(read_mnist(root), opts, CLIENTS, seed=0)


def test_it_offers_every_method_a_task_source_has() -> None:
    for name, member in inspect.getmembers(TaskSource, inspect.isfunction):
        assert hasattr(ImageTasks, name), name
        ours = inspect.signature(getattr(ImageTasks, name)).parameters
        assert ours.keys() == inspect.signature(member).parameters.keys()
    assert ImageTasks.augment is None


def test_clients_share_a_task_without_overlap(write_mnist: Callable[..., Path]) -> None:
    tasks = _split_mnist(write_mnist(train=200, test=50))
    assert list(tasks.tasks) == ["task_0", "task_1", "task_2", "task_3", "task_4"]
    seen = []
    for client in CLIENTS:
        x, y = tasks.train_data(client, "task_1")
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert set(y.tolist()) <= {2, 3}
        seen.append(x)
    # IID over 4 clients: 40 samples of classes 2 and 3 in all, none given twice.
    assert sum(len(x) for x in seen) == 40
    assert len(torch.cat(seen).flatten(1).unique(dim=0)) == 40


def test_inputs_are_normalised_per_channel(write_cifar10: Callable[..., Path]) -> None:
    tasks = ImageTasks(read_cifar10(write_cifar10(per_batch=40)), ImageOpts.from_dict({}), CLIENTS[:1], seed=0,
                       tasks=["cifar"])
    x, y = tasks.train_data(CLIENTS[0], "cifar")
    assert x.shape == (200, 3, 32, 32) and len(y) == 200
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_pooled_scoring_uses_the_test_samples_of_the_task(write_mnist: Callable[..., Path]) -> None:
    tasks = _split_mnist(write_mnist(train=100, test=50))
    model = tasks.build_model({"name": "mlp", "hidden": [8]}, generator(0, "model"))
    count, metrics = tasks.score(model, "client-2", "task_4", torch.device("cpu"))
    assert count == 10 and set(metrics) == {"val_acc", "val_loss"}
    assert count == tasks.score(model, "client-0", "task_4", torch.device("cpu"))[0]


def test_client_test_sets_follow_each_clients_classes(write_mnist: Callable[..., Path]) -> None:
    root = write_mnist(train=400, test=200)
    tasks = ImageTasks(read_mnist(root), ImageOpts.from_dict({"partition": {"name": "shards", "shards_per_client": 2},
                                                              "test": "client"}), CLIENTS, seed=0, tasks=["all"])
    held = []
    for i, client in enumerate(CLIENTS):
        trained = set(tasks.train_data(client, "all")[1].tolist())
        part = tasks.test_parts[i]
        assert set(tasks.data.test.labels[part].tolist()) <= trained
        held += part.tolist()
    assert len(held) == len(set(held))
    model = tasks.build_model({"name": "mlp", "hidden": [8]}, generator(0, "model"))
    assert tasks.score(model, "client-1", "all", torch.device("cpu"))[0] == len(tasks.test_parts[1])
    assert tasks.score_global(model, "all", torch.device("cpu"))[0] == 200


def test_a_client_without_samples_of_a_task_is_told_so(write_mnist: Callable[..., Path]) -> None:
    # One shard of 25 label-sorted samples each: the client of the first shard holds classes 0-2 only.
    tasks = _split_mnist(write_mnist(train=100), partition={"name": "shards", "shards_per_client": 1})
    client = next(c for c, i in tasks.clients.items() if tasks.data.train.labels[tasks.train_parts[i]].max() == 2)
    assert len(tasks.train_data(client, "task_0")[1]) == 20
    with pytest.raises(ValueError, match=rf"client '{client}': expected training samples of task 'task_4' \(classes "
                                         rf"8-9\), found none in its shards share"):
        tasks.train_data(client, "task_4")


def test_unknown_task_and_client_are_one_line_errors(write_mnist: Callable[..., Path]) -> None:
    tasks = _split_mnist(write_mnist())
    with pytest.raises(ValueError, match=r"task 'task_9': expected one of task_0, task_1, task_2, task_3, task_4 for "
                                         r"mnist, found 'task_9'"):
        tasks.train_data("client-0", "task_9")
    with pytest.raises(ValueError, match=r"client 'client-7': expected one of the 4 clients the data was partitioned "
                                         r"over, found an unknown name"):
        tasks.train_data("client-7", "task_0")


def test_model_name_outside_the_zoo_is_refused(write_mnist: Callable[..., Path]) -> None:
    tasks = _split_mnist(write_mnist())
    with pytest.raises(ValueError, match=r"model_opts.name: expected one of cnn, mlp for task_opts.dataset mnist, "
                                         r"found 'resnet18'"):
        tasks.build_model({"name": "resnet18"}, generator(0))


@pytest.mark.parametrize("image, message", [
    ({"split": 2}, r"task_opts.image.split: expected one of partition, classes_per_task, task_names, test, "
                   r"test_fraction, found 'split'"),
    ({"test": "global"}, r"task_opts.image.test: expected one of pooled, client, found 'global'"),
    ({"partition": "iid"},
     r"task_opts.image.partition: expected a mapping with a name \(and its options\), found 'iid'"),
    ({"test_fraction": 1.5}, r"task_opts.image.test_fraction: expected a number between 0 and 1, found 1.5"),
])
def test_bad_image_options_are_one_line_errors(image: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageOpts.from_dict(image)


def test_build_from_a_config_with_compact_clients(write_cifar10: Callable[..., Path]) -> None:
    config = {
        "datasets_dir": str(write_cifar10(per_batch=20)),
        "task_opts": {"dataset": "cifar10", "image": {"partition": {"name": "dirichlet", "alpha": 0.5},
                                                      "classes_per_task": 5, "task_names": ["first", "second"]}},
        "clients": {"count": 3, "prefix": "site-", "tasks": ["first", "second"]},
    }
    tasks = build_image_tasks(config, seed=1)
    assert list(tasks.clients) == ["site-0", "site-1", "site-2"]
    assert tasks.tasks == {"first": (0, 1, 2, 3, 4), "second": (5, 6, 7, 8, 9)}
    model = tasks.build_model({"name": "cnn", "channels": [4]}, generator(1))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def _fedavg(tasks: ImageTasks, task: str, model_opts: dict, rounds: int, lr: float) -> float:
    """Rounds of FedAvg over every client, called on the task source directly; the global model's pooled accuracy."""
    global_model = tasks.build_model(model_opts, generator(0, "model"))
    for rnd in range(rounds):
        uploads = {}
        for client in tasks.clients:
            local = tasks.empty_model(model_opts, torch.device("cpu"))
            local.load_state_dict(global_model.state_dict())
            x, y = tasks.train_data(client, task)
            train_local(local, torch.optim.SGD(local.parameters(), lr=lr), None, torch.nn.CrossEntropyLoss(), x, y,
                        epochs=1, batch_size=32, shuffle=generator(0, rnd, client))
            uploads[client] = Upload(state=local.state_dict(), samples=len(y))
        global_model.load_state_dict(weighted_mean(uploads))
    pooled = tasks.score_global(global_model, task, torch.device("cpu"))
    assert pooled == tasks.score(global_model, "client-0", task, torch.device("cpu"))  # test: pooled
    return pooled[1]["val_acc"]


def test_fedavg_learns_a_written_mnist_folder(write_mnist: Callable[..., Path]) -> None:
    tasks = ImageTasks(read_mnist(write_mnist(train=240, test=100)), ImageOpts.from_dict(
        {"partition": {"name": "dirichlet", "alpha": 1.0}}), CLIENTS, seed=0, tasks=["mnist"])
    assert _fedavg(tasks, "mnist", {"name": "mlp", "hidden": [32]}, rounds=3, lr=0.1) > 0.9  # chance is 0.1


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs fedevents[datasets] (scikit-learn)")
def test_fedavg_learns_the_real_digits_and_a_split_task() -> None:
    config = {"task_opts": {"dataset": "digits", "image": {"partition": {"name": "dirichlet", "alpha": 0.5},
                                                           "classes_per_task": 5}},
              "clients": [{"client_name": c, "tasks": ["task_0", "task_1"]} for c in CLIENTS]}
    tasks = build_image_tasks(config, seed=0)
    accuracy = _fedavg(tasks, "task_1", {"name": "mlp", "hidden": [64]}, rounds=4, lr=0.1)
    assert accuracy > 0.8  # chance among the task's 5 classes is 0.2


def test_femnist_clients_are_scored_on_their_own_writers(write_femnist: Callable[..., Path]) -> None:
    config = {"datasets_dir": str(write_femnist(writers=6, per_writer=4)),
              "task_opts": {"dataset": "femnist", "image": {"partition": {"name": "natural"}, "test": "client"}},
              "clients": [{"client_name": f"c{i}", "tasks": ["femnist"]} for i in range(3)]}
    tasks = build_image_tasks(config, seed=0)
    train_writers, test_writers = tasks.data.train.writers, tasks.data.test.writers
    for i in range(3):
        mine = {train_writers[j] for j in tasks.train_parts[i].tolist()}
        assert len(mine) == 2 and {test_writers[j] for j in tasks.test_parts[i].tolist()} == mine
        assert tasks.score(tasks.build_model({"name": "mlp", "hidden": [4]}, generator(0)), f"c{i}", "femnist",
                           torch.device("cpu"))[0] == 4  # two test samples per writer
