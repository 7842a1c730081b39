"""FedProx: FedAvg plus a proximal term that keeps local weights near the global model the client received."""

from __future__ import annotations

import torch

from typing import Callable

from .base import LocalRound, Method, ModelOutput, ServerState, every_entry, no_entry, option

__all__ = ["FedProx"]


class FedProx(Method):
    """Loss + mu/2 * ||w - w_global||^2, with w_global the model dispatched to the client this round."""

    name = "fedprox"
    defaults = {"mu": 0.01}
    # FedSTIL's proximal term is lambda_l2 * ||w - w_global||^2, which is mu/2 with mu = 2 * lambda_l2.
    aliases = {"lambda_l2": ("mu", 2.0)}

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.mu = option(self.options, "mu", 0.01, method=self.name)

    def replaced_on_dispatch(self, server: ServerState, *, switching: bool) -> Callable[[str], bool]:
        """Every entry, as FedAvg; none under ``legacy``, whose anchor is the client's stored weights."""
        return no_entry if self.legacy else every_entry

    def start(self, rnd: LocalRound) -> None:
        super().start(rnd)
        # The anchor is the received global model, on the training device, never the client's old weights...
        rnd.scratch["anchor"] = [p.detach().clone() for p in rnd.model.parameters()]
        if self.legacy and rnd.previous_model is not None:
            # ...but FedSTIL's runner took it before applying the update: the client's own last weights (B9).
            rnd.scratch["anchor"] = [rnd.previous_model[name].to(rnd.device, copy=True)
                                     for name, _ in rnd.model.named_parameters()]

    def batch_loss(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor, out: ModelOutput,
                   loss: torch.Tensor) -> torch.Tensor:
        return loss + self.mu / 2 * proximal(rnd.model, rnd.scratch["anchor"])


def proximal(model: torch.nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """Sum over trainable parameters of ||w - anchor||^2."""
    terms = [(p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor) if p.requires_grad]
    return torch.stack(terms).sum() if terms else torch.zeros(())
