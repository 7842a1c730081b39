"""The continual methods run on a class-incremental image stream: each keeps what it learnt of the finished task."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from fedevents.federated.datasets import ImageOpts, ImageTasks, read_mnist
from fedevents.federated.methods import ServerState, build_method
from fedevents.federated.seeds import generator
from fedevents.federated.worker import TrainJob, Worker


def _config(method: str, fed_config: dict[str, Any]) -> dict[str, Any]:
    return {**fed_config, "exp_method": method, "model_opts": {"name": "mlp", "hidden": [16]},
            "method_opts": {"memory_size": 20} if method == "icarl" else {}}


@pytest.mark.parametrize("method, kept", [
    ("ewc", {"importance", "anchor"}), ("mas", {"importance", "anchor"}),
    ("icarl", {"exemplar_x", "exemplar_y", "old_model", "old_classes"}),
])
def test_second_task_keeps_the_first(method: str, kept: set[str], write_mnist: Callable[..., Path],
                                     fed_config: dict[str, Any], quiet_logs: None) -> None:
    tasks = ImageTasks(read_mnist(write_mnist(train=80, test=20)), ImageOpts.from_dict({"classes_per_task": 5}),
                       ["c0", "c1"], seed=0)
    config = _config(method, fed_config)
    worker = Worker(config, 0, tasks=tasks)
    server = ServerState(tasks.build_model(config["model_opts"], generator(0, "model")).state_dict())
    payload = build_method(method, config["method_opts"]).payload(server, "c0", "integrated")
    first = worker.train(TrainJob("c0", "task_0", 0, "cpu", 0, payload, None))
    assert first.samples == len(tasks.train_data("c0", "task_0")[1]) and first.state.task == "task_0"
    second = worker.train(TrainJob("c0", "task_1", 1, "cpu", 0, payload, first.state))
    assert second.state.task == "task_1" and kept <= set(second.state.memory)
    if method == "icarl":
        # The exemplars come from the finished task's classes, read back through the task source.
        assert set(second.state.memory["exemplar_y"].tolist()) == {0, 1, 2, 3, 4}
        assert sorted(second.state.memory["old_classes"]) == [0, 1, 2, 3, 4]
