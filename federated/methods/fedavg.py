"""FedAvg: every client starts from the global model; the server takes the sample-weighted mean."""

from __future__ import annotations

from .base import Method

__all__ = ["FedAvg"]


class FedAvg(Method):
    """The contract's default behaviour, named."""

    name = "fedavg"
