"""Federated and federated-continual learning in plain torch: tasks, models, methods, metrics, client states.

Knows nothing of events or of the engine; the handlers call ``Federation`` from worker threads.
"""

from __future__ import annotations

from .devices import check_device
from .precision import check_precision
from .backbones import REID_MODELS, build_reid_model
from .fedavg import AggregateResult, FedAvgClient, Upload, weighted_mean
from .federation import DATASETS, METHODS, Federation, TrainResult, UploadResult, ValResult
from .methods import Method, build_method
from .reid_metrics import reid_scores
from .server import FedAvgServer, Server
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
    "Method",
    "REID_MODELS",
    "Server",
    "OPTIMIZERS",
    "SCHEDULERS",
    "SyntheticSpec",
    "TrainResult",
    "Upload",
    "UploadResult",
    "ValResult",
    "build_method",
    "build_model",
    "build_reid_model",
    "reid_scores",
    "check_device",
    "check_precision",
    "client_data",
    "derive_seed",
    "empty_model",
    "generator",
    "label_proportions",
    "weighted_mean",
]
