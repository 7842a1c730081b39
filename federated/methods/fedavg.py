"""FedAvg: every client starts from the global model; the server takes the sample-weighted mean."""

from __future__ import annotations

from typing import Callable

from .base import Method, ServerState, every_entry

__all__ = ["FedAvg"]


class FedAvg(Method):
    """The contract's default behaviour, named."""

    name = "fedavg"

    def replaced_on_dispatch(self, server: ServerState, *, switching: bool) -> Callable[[str], bool]:
        """Every entry: ``start`` loads the global model over the client's whole model."""
        return every_entry
