"""Stored tensors that other tensors of the same state predict closely, so a checkpoint stores only the bits
by which they differ from the prediction.

A method names them (``Method.server_predictions``): a tensor at a path of the server's state, predicted by
a rule applied to the tensors at other paths. The rule's name is written into checkpoints, and loading
computes the prediction again from the tensors it has decoded, so a rule's result must depend on its inputs'
bits alone: elementwise arithmetic (one rounding per operation, whatever the threads or vector width), never
a reduction. What a named rule computes never changes; a new computation gets a new name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["RULES", "Prediction", "complement_scaled", "predict"]


def complement_scaled(atten: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(1 - atten) * weight`` with ``atten`` along ``weight``'s last axis: the ``A`` a FedSTIL adaptive layer
    starts each round with."""
    return (1 - atten.reshape((1,) * (weight.dim() - 1) + (-1,))) * weight


#: Rules by the name checkpoints give them. "same": the one source as it is.
RULES: dict[str, Callable[..., torch.Tensor]] = {
    "same": lambda source: source,
    "complement-scaled": complement_scaled,
}


@dataclass(frozen=True, slots=True)
class Prediction:
    """A tensor's prediction: ``RULES[rule]`` applied to the tensors at ``sources`` (paths in one state)."""

    rule: str
    sources: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"prediction: expected a rule in {sorted(RULES)}, found {self.rule!r}")


def predict(rule: str, sources: list[torch.Tensor]) -> torch.Tensor:
    """The prediction ``rule`` makes from ``sources``; ValueError for a rule this fedevents does not know, or
    sources that do not fit it."""
    if rule not in RULES:
        raise ValueError(f"expected a prediction rule in {sorted(RULES)}, found {rule!r}")
    try:
        return RULES[rule](*sources)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"expected sources that rule {rule!r} can combine, found: {exc}") from None
