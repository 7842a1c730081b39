"""Models built on the ``meta`` device (shapes only) and given real, uninitialised storage afterwards."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["materialise"]


def materialise(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model.to_empty(device=device)`` for a model on the meta device, without importing sympy.

    ``to_empty`` allocates through ``empty_like`` of a meta tensor, which torch runs as a Python reference
    that imports ``torch.fx.experimental.symbolic_shapes`` and with it sympy: 0.5-1 s of start-up. Allocating
    by shape and strides on the target device gives the same uninitialised tensors through the device's own
    kernel. A model meant for the meta device already is one.
    """
    device = torch.device(device)
    if device.type == "meta":
        return model
    return model._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))
