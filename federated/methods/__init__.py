"""Federated (continual) methods by name: each a server half and a client half (see ``base``)."""

from __future__ import annotations

from typing import Any, Mapping

from ..registry import Catalogue, Component, is_target, load_target
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

__all__ = ["LocalRound", "Method", "ModelOutput", "ServerState", "REGISTRY", "METHODS", "CATALOGUE", "build_method",
           "method_class"]

REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (Baseline, EWC, FedAvg, FedCurv, FedProx, FedSTIL, FedSTILAtten, FedWeIT, ICaRL, MAS)
}
METHODS = tuple(sorted(REGISTRY))




def _not_a_method(obj: Any) -> str | None:
    return None if isinstance(obj, type) and issubclass(obj, Method) else "a subclass of fedevents.federated.Method"


#: Methods a config may name: every name in REGISTRY (read when asked, so later registrations count) and
#: a user's Method subclass as "package.module:Name".
CATALOGUE = Catalogue(
    "methods",
    lambda: {name: Component(name, dict(cls.defaults), dict(getattr(cls, "aliases", {}))) for name, cls in REGISTRY.items()},
    _not_a_method,
)


def build_method(
    name: str, options: Mapping[str, Any] | None = None, *, seed: int = 0, legacy: bool = False
) -> Method:
    """The method ``exp_method`` names, built with ``method_opts``, the experiment's seed and
    ``exp_opts.legacy`` (FedSTIL's runner's behaviour, docs/fedstil.md); a ValueError names a bad option.

    A ``"package.module:Name"`` was imported when the config was checked (from the config's folder if it
    sits there), so importing it again finds the loaded module.
    """
    method = method_class(name)(options)
    method.seed = seed
    method.legacy = legacy
    return method


def method_class(name: str) -> type[Method]:
    """The class ``exp_method`` names (what it declares, such as ``reusable_scores``, without building it)."""
    if name in REGISTRY:
        cls = REGISTRY[name]
    elif is_target(name):
        cls = load_target(name)
        problem = _not_a_method(cls)
        if problem:
            raise ValueError(f"exp_method: expected {problem}, found {name}")
    else:
        raise ValueError(f"exp_method: expected one of {', '.join(sorted(REGISTRY))}, found {name!r}")
    return cls
