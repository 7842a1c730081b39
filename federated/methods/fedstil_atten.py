"""FedSTIL-atten: FedSTIL whose global weight is a bank of clients' weights mixed by a trainable attention.

Each adaptive layer holds a bank of ``bank_size`` weights and computes ``theta = sum_k alpha_k G[..., k] + A``
with ``alpha`` trainable (reset to ``atten_default`` each round) and ``A`` kept across rounds; the loss adds
``lambda_l1 * (||alpha0 - alpha||_1 + ||A0 - A||_1)``. The server fills the bank with the latest ``theta`` of
the ``bank_size`` clients that uploaded most recently (ties by name) and sends the same bank to everyone.
The original banks every registered client, so its memory grows with the clients; a fixed bank keeps every
model, checkpoint and payload the same size. Prototype rehearsal and task tokens are FedSTIL's (the tokens
are collected, as in the original, but not used).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..fedavg import Upload
from .adaptive import BankLayer, adapt, layer_entries
from .base import ServerState
from .counts import count_option
from .fedstil import FedSTIL

__all__ = ["FedSTILAtten"]


class FedSTILAtten(FedSTIL):
    """FedSTIL with a bank of clients' weights and a trainable attention over it."""

    name = "fedstil-atten"
    defaults = {**FedSTIL.defaults, "bank_size": 5}

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.bank_size = count_option(self.options, "bank_size", method=self.name, minimum=1)

    def prepare(self, model: nn.Module) -> nn.Module:
        return adapt(model, lambda layer: BankLayer(layer, self.atten_default, self.bank_size))

    def payload(self, server: ServerState, client: str, kind: str) -> dict[str, Any]:
        """A new client gets the global model, a known one the bank alone (its own ``A`` stays)."""
        if kind == "integrated":
            return {"model": server.model}
        return {"global": {key[: -len(".alpha0")]: server.model[key[: -len("alpha0")] + "G"]
                           for key in server.model if key.endswith(".alpha0")}}

    def replaced_on_dispatch(self, server: ServerState, *, switching: bool) -> Callable[[str], bool]:
        """Every layer's bank ``G``, ``alpha`` and anchors: the payload holds the bank for every layer and
        ``reset`` restarts the rest; ``A`` persists across rounds, so it is the client's own."""
        layers = [key[: -len(".alpha0")] for key in server.model if key.endswith(".alpha0")]
        return layer_entries(layers, ("G", "alpha", "alpha0", "A0"))

    def aggregate(self, server: ServerState, uploads: Mapping[str, Upload]) -> ServerState:
        """The bank <- the latest ``theta`` of the ``bank_size`` most recent uploaders, zeros after them."""
        thetas = {**server.extras.get("theta", {}), **{n: u.extras["theta"] for n, u in uploads.items()}}
        rounds = {**server.extras.get("uploaded", {}), **{n: server.round for n in uploads}}
        tokens = {name: list(history) for name, history in server.extras.get("tokens", {}).items()}
        for name in sorted(uploads):
            tokens.setdefault(name, []).append(uploads[name].extras["token"])
        chosen = sorted(thetas, key=lambda n: (-rounds[n], n))[: self.bank_size]
        model = dict(server.model)
        for layer in thetas[chosen[0]]:
            bank = torch.zeros_like(model[f"{layer}.G"])
            for slot, name in enumerate(chosen):
                bank[..., slot] = thetas[name][layer]
            model[f"{layer}.G"] = bank
        return ServerState(model, {**server.extras, "theta": thetas, "tokens": tokens, "uploaded": rounds})

    @staticmethod
    def thetas(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layers = [key[: -len(".alpha0")] for key in state if key.endswith(".alpha0")]
        return {layer: (state[f"{layer}.G"] * state[f"{layer}.alpha"]).sum(-1) + state[f"{layer}.A"]
                for layer in layers}
