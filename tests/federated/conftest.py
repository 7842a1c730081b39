"""Shared fixtures for the federated tests: the default experiment config the engine would hand over."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import pytest
import structlog

from fedevents.federated.synth_reid import generate_synth_reid


@pytest.fixture
def fed_config() -> dict[str, Any]:
    """A fresh copy of the merged default config (FedAvg, MLP, SGD, synthetic vectors)."""
    return {
        "exp_method": "fedavg",
        "model_opts": {"name": "mlp", "hidden": [64, 64]},
        "optimizer_opts": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0},
        "scheduler_opts": {"name": "none", "step_size": 10, "gamma": 0.5, "t_max": 10},
        "criterion_opts": {"name": "cross_entropy", "epsilon": 0.0},
        "task_opts": {
            "dataset": "synthetic",
            "sustain_rounds": 1,
            "train_epochs": 1,
            "batch_size": 32,
            "synthetic": {
                "num_classes": 10,
                "input_shape": [32],
                "samples_per_client": 200,
                "label_skew": 0.5,
                "test_size": 100,
                "noise": 1.0,
            },
        },
    }


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """Drop info lines for the duration of a test that trains a lot (one line per epoch otherwise)."""
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**previous)


@pytest.fixture(scope="session")
def two_task_reid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FedSTIL-layout ReID data set: 2 clients x 2 tasks of 3 identities, 4 images each, 32x16."""
    out = tmp_path_factory.mktemp("reid")
    generate_synth_reid(out, clients=2, tasks=2, ids_per_task=3, images_per_id=4, cameras=2, img_size=(32, 16),
                        sustain_rounds=1, seed=5)
    return out
