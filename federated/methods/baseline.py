"""Baseline: every client learns alone; the server neither sends nor combines anything after the start."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..fedavg import Upload
from .base import LocalRound, Method, ServerState

__all__ = ["Baseline"]


class Baseline(Method):
    """Local training only: a new client starts from the initial model, then keeps its own."""

    name = "baseline"
    models_per_task = True  # FedSTIL's mm; a client with model_ckpt_name keeps one model (sm)

    def payload(self, server: ServerState, client: str, kind: str) -> dict[str, Any]:
        return {"model": server.model} if kind == "integrated" else {}

    def aggregate(self, server: ServerState, uploads: Mapping[str, Upload]) -> ServerState:
        return server

    def start(self, rnd: LocalRound) -> None:
        own = rnd.previous_model if rnd.previous_model is not None else rnd.payload["model"]
        rnd.model.load_state_dict(own)

    def upload(self, model: Mapping[str, torch.Tensor], samples: int, memory: Mapping[str, Any]) -> Upload:
        return Upload(state={}, samples=samples)  # nothing leaves the client
