"""Federated learning in plain torch: synthetic tasks, models, local training, client states and FedAvg.

Knows nothing of events or of the engine; the handlers call ``Federation`` from worker threads.
"""

from __future__ import annotations

from .devices import check_device
from .fedavg import AggregateResult, FedAvgClient, FedAvgServer, Upload, weighted_mean
from .federation import DATASETS, METHODS, Federation, TrainResult, UploadResult, ValResult
from .models import MODELS, build_model, empty_model
from .seeds import derive_seed, generator
from .store import ClientState, ClientStore
from .synthetic import ClientData, SyntheticSpec, client_data, label_proportions
from .training import CRITERIA, OPTIMIZERS, SCHEDULERS

__all__ = [
    "AggregateResult",
    "CRITERIA",
    "ClientData",
    "ClientState",
    "ClientStore",
    "DATASETS",
    "FedAvgClient",
    "FedAvgServer",
    "Federation",
    "METHODS",
    "MODELS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "SyntheticSpec",
    "TrainResult",
    "Upload",
    "UploadResult",
    "ValResult",
    "build_model",
    "check_device",
    "client_data",
    "derive_seed",
    "empty_model",
    "generator",
    "label_proportions",
    "weighted_mean",
]
