"""FedCurv: FedAvg plus a penalty that keeps each client near the other clients' weights where their Fisher is high.

Client i uploads, beside its model, its Fisher diagonal ``u_i`` (on its current task's training samples at
its trained weights) and ``v_i = u_i * w_i``. The server sums them over the round's uploads, ``U = sum u_j``
and ``V = sum v_j``, and sends both with the global model. Client i then trains with

    loss + lambda * sum over parameters of (w^2 * (U - u_i) - 2 * w * (V - v_i))

which is ``lambda * sum_{j != i} u_j (w - w_j)^2`` less a constant that does not depend on ``w``, so the
penalty as reported may be negative. The client's own ``(u_i, v_i)`` are taken out only when its upload is
among those summed; otherwise (it missed that round) they are not in ``U``, ``V`` to take out.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..fedavg import Upload, weighted_mean
from .base import LocalRound, Method, ModelOutput, ServerState, every_entry, option
from .counts import count_option
from .importance import fisher_diagonal, fisher_form

__all__ = ["FedCurv"]


class FedCurv(Method):
    """FedAvg with the curvature penalty lambda * sum_{j != i} u_j (w - w_j)^2 (up to a constant)."""

    name = "fedcurv"
    defaults = {"lambda": 1.0, "fisher_batches": None, "fisher": "per_sample"}
    aliases = {"lambda_penalty": ("lambda", 1.0)}

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.strength = option(self.options, "lambda", 1.0, method=self.name)
        self.fisher_batches = count_option(self.options, "fisher_batches", method=self.name, minimum=1,
                                           optional=True)
        self.fisher = fisher_form(self.options, method=self.name)

    # server half -------------------------------------------------------------------------------------
    def payload(self, server: ServerState, client: str, kind: str) -> dict[str, Any]:
        """The global model, the summed ``u`` and ``v``, and the clients whose uploads are in those sums.

        Before any aggregation the sums are zeros shaped like each floating-point entry of the global state,
        in its order: every parameter is there, and a client adds nothing to its loss.
        """
        if "u" not in server.extras:
            zeros = {name: torch.zeros_like(t) for name, t in server.model.items() if t.is_floating_point()}
            return {"model": server.model, "u": zeros, "v": dict(zeros), "clients": []}
        return {"model": server.model, "u": server.extras["u"], "v": server.extras["v"],
                "clients": server.extras["clients"]}

    def aggregate(self, server: ServerState, uploads: Mapping[str, Upload]) -> ServerState:
        """FedAvg's model, and ``U``, ``V`` summed over this round's uploads only."""
        names = sorted(uploads)
        for name in names:
            missing = {"u", "v"} - set(uploads[name].extras)
            if missing:
                raise ValueError(f"fedcurv: upload from {name!r} expected extras u and v, found "
                                 f"{sorted(uploads[name].extras) or 'none'}")
        extras = {
            **server.extras,
            "u": _sum([uploads[name].extras["u"] for name in names]),
            "v": _sum([uploads[name].extras["v"] for name in names]),
            "clients": names,
        }
        return ServerState(weighted_mean(uploads), extras)

    def replaced_on_dispatch(self, server: ServerState, *, switching: bool) -> Callable[[str], bool]:
        """Every entry: ``start`` loads the global model first (``u`` and ``v`` live in the method's memory)."""
        return every_entry

    # client half -------------------------------------------------------------------------------------
    def start(self, rnd: LocalRound) -> None:
        super().start(rnd)
        own = rnd.client in rnd.payload["clients"] and "u" in rnd.memory
        curvature = []
        for name, p in rnd.model.named_parameters():
            if not p.requires_grad:
                continue
            u = rnd.payload["u"][name].to(rnd.device)
            v = rnd.payload["v"][name].to(rnd.device)
            if own:
                u = u - rnd.memory["u"][name].to(rnd.device)
                v = v - rnd.memory["v"][name].to(rnd.device)
            curvature.append((p, u, v))
        rnd.scratch["curvature"] = curvature

    def batch_loss(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor, out: ModelOutput,
                   loss: torch.Tensor) -> torch.Tensor:
        curvature = rnd.scratch["curvature"]
        if not curvature:
            return loss
        terms = [(p.pow(2) * u - 2 * p * v).sum() for p, u, v in curvature]
        return loss + self.strength * torch.stack(terms).sum()

    def finish(self, rnd: LocalRound) -> None:
        """Measure ``u`` on the task just trained, at the trained weights, and ``v = u * w``."""
        x, y = rnd.task_inputs(rnd.task)
        u = fisher_diagonal(rnd.model, rnd.forward_inputs, x, y, batches=self.fisher_batches,
                            form=self.fisher)
        weights = dict(rnd.model.named_parameters())
        rnd.memory["u"] = u
        rnd.memory["v"] = {name: value * weights[name].detach() for name, value in u.items()}

    def upload(self, model: Mapping[str, torch.Tensor], samples: int, memory: Mapping[str, Any]) -> Upload:
        return Upload(state=model, samples=samples, extras={"u": memory["u"], "v": memory["v"]})


def _sum(terms: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Add dicts of tensors key by key, in float64 and in the order given (the uploads' name order)."""
    total: dict[str, torch.Tensor] = {}
    for name, first in terms[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for term in terms:
            acc += term[name].to(acc.device, torch.float64)
        total[name] = acc.to(first.dtype)
    return total
