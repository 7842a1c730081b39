"""Consolidation, the client half EWC and MAS share: a pull toward the weights each finished task ended with.

When a client starts a new task it first measures, with the model it finished the old task with and on that
task's training samples, how much each parameter matters; the importances add up over tasks and the anchor
moves to those weights. Local training then adds ``scale * lambda * sum_i importance_i (w_i - anchor_i)^2``.
The server half is FedAvg's.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch

from .base import LocalRound, Method, ModelOutput, ServerState, every_entry, no_entry, option
from .switch import finished_task

__all__ = ["Consolidation"]


class Consolidation(Method):
    """FedAvg plus an importance-weighted quadratic pull toward the last finished task's weights."""

    #: The penalty's factor in front of lambda (1/2 for EWC, 1 for MAS).
    scale: ClassVar[float] = 1.0

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.strength = option(self.options, "lambda", self.defaults["lambda"], method=self.name)

    def importance(self, rnd: LocalRound, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each trainable parameter's importance on ``(x, y)``, for the weights now in ``rnd.model``.

        ``x`` is in the task's stored form: run the model on it with ``rnd.forward_inputs``.
        """
        raise NotImplementedError

    def replaced_on_dispatch(self, server: ServerState, *, switching: bool) -> Callable[[str], bool]:
        """Every entry, as FedAvg, except at a task switch: ``consolidate`` reads the stored model first."""
        return no_entry if switching else every_entry

    def start(self, rnd: LocalRound) -> None:
        finished = finished_task(rnd)
        if finished is not None:
            self.consolidate(rnd, finished)
        super().start(rnd)
        importance = rnd.memory.get("importance")
        if importance is not None:
            anchor = rnd.memory["anchor"]
            rnd.scratch["pull"] = [
                (p, importance[name].to(rnd.device), anchor[name].to(rnd.device))
                for name, p in rnd.model.named_parameters() if p.requires_grad
            ]

    def consolidate(self, rnd: LocalRound, finished: str) -> None:
        """Add ``finished``'s importances to the client's total and anchor at the weights it ended with."""
        assert rnd.previous_model is not None  # finished_task checked it
        rnd.model.load_state_dict(rnd.previous_model)
        x, y = rnd.task_inputs(finished)
        new = self.importance(rnd, x, y)
        total = rnd.memory.get("importance")
        # New tensors, never sums in place: rnd.memory is a shallow copy of the stored memory, which must
        # stay as it was if this round is never committed.
        rnd.memory["importance"] = new if total is None else {
            name: total[name].to(value.device) + value for name, value in new.items()
        }
        rnd.memory["anchor"] = {name: rnd.previous_model[name].detach().clone() for name in new}

    def batch_loss(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor, out: ModelOutput,
                   loss: torch.Tensor) -> torch.Tensor:
        pull = rnd.scratch.get("pull")
        if not pull:
            return loss  # nothing consolidated yet
        terms = [(importance * (p - anchor).pow(2)).sum() for p, importance, anchor in pull]
        return loss + self.scale * self.strength * torch.stack(terms).sum()
