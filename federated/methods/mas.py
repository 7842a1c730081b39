"""MAS: FedAvg, and on each client a pull toward its last finished task's weights by output sensitivity."""

from __future__ import annotations

import torch

from .base import LocalRound
from .consolidation import Consolidation
from .importance import output_sensitivity

__all__ = ["MAS"]


class MAS(Consolidation):
    """Loss + lambda * sum_i Omega_i (w_i - w*_i)^2; Omega sums each finished task's mean |d ||f(x)||^2 / dw|.

    Omega is measured on the finished task's training samples, never on a held-out set: importances are
    learnt from what the client trained on.
    """

    name = "mas"
    defaults = {"lambda": 1.0}
    scale = 1.0
    aliases = {"lambda_penalty": ("lambda", 1.0)}

    def importance(self, rnd: LocalRound, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return output_sensitivity(rnd.model, rnd.forward_inputs, x, y)
