"""EWC (online): FedAvg, and on each client a pull toward its last finished task's weights by Fisher importance."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import LocalRound
from .consolidation import Consolidation
from .counts import count_option
from .importance import fisher_diagonal, fisher_form

__all__ = ["EWC"]


class EWC(Consolidation):
    """Loss + lambda/2 * sum_i F_i (w_i - w*_i)^2; F sums each finished task's empirical Fisher diagonal.

    ``fisher_batches`` caps the samples the Fisher is measured on at that many batches of 64 (evenly
    spaced over the task's training samples); null uses them all. ``fisher`` chooses its form: per_sample
    (the empirical Fisher) or batch (FedSTIL's squared batch gradients, one backward pass per batch).
    """

    name = "ewc"
    # 10, not the 100 seen elsewhere: plain SGD on the penalty is stable only while lr * lambda * max F < 2,
    # and with SGD at lr 0.05 on the synthetic task max F was 0.72 (100 diverged to NaN).
    defaults = {"lambda": 10.0, "fisher_batches": None, "fisher": "per_sample"}
    scale = 0.5
    # FedSTIL's penalty is lambda_penalty * sum F (w - w*)^2, without the 1/2.
    aliases = {"lambda_penalty": ("lambda", 2.0)}

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.fisher_batches = count_option(self.options, "fisher_batches", method=self.name, minimum=1,
                                           optional=True)
        self.fisher = fisher_form(self.options, method=self.name)

    def importance(self, rnd: LocalRound, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return fisher_diagonal(rnd.model, rnd.forward_inputs, x, y, batches=self.fisher_batches,
                               form=self.fisher)
