"""Federated (continual) methods by name: each a server half and a client half (see ``base``)."""

from __future__ import annotations

from typing import Any, Mapping

from .base import LocalRound, Method, ModelOutput, ServerState
from .baseline import Baseline
from .ewc import EWC
from .fedavg import FedAvg
from .fedcurv import FedCurv
from .fedprox import FedProx
from .fedstil import FedSTIL
from .fedstil_atten import FedSTILAtten
from .fedweit import FedWeIT
from .icarl import ICaRL
from .mas import MAS

__all__ = ["LocalRound", "Method", "ModelOutput", "ServerState", "REGISTRY", "METHODS", "build_method"]

REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (Baseline, EWC, FedAvg, FedCurv, FedProx, FedSTIL, FedSTILAtten, FedWeIT, ICaRL, MAS)
}
METHODS = tuple(sorted(REGISTRY))


def build_method(name: str, options: Mapping[str, Any] | None = None, *, seed: int = 0) -> Method:
    """The method ``exp_method`` names, built with ``method_opts`` and the experiment's seed; a ValueError
    names a bad option."""
    if name not in REGISTRY:
        raise ValueError(f"exp_method: expected one of {', '.join(METHODS)}, found {name!r}")
    method = REGISTRY[name](options)
    method.seed = seed
    return method
