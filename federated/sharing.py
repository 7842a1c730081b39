"""Tensors held once however many states hold them: a new state's tensor that equals, bit for bit, an older
state's tensor of the same name is replaced by a reference to the older one.

A client that fine-tunes part of a network hands back the frozen rest unchanged, so without sharing every
client's stored state would carry its own copy of the global model's frozen weights. The states fedevents
keeps are never changed in place (the client store's and the server's rule), so one tensor can serve them all.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["bitwise_equal", "share_equal"]

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Tell whether ``a`` and ``b`` hold the same bits: same dtype, shape and device, every element's bytes
    equal (unlike ``torch.equal``, -0.0 differs from 0.0 and a NaN equals the same NaN)."""
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        bits = _BITS.get(a.element_size())
        if bits is None or a.is_complex():
            return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
        return torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)


def share_equal(
    state: Mapping[str, torch.Tensor], *bases: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """``state`` with each tensor that is bitwise equal to the tensor of the same name in one of ``bases``
    (the first that has it) replaced by that tensor; the others are kept as they are."""
    out = {}
    for key, tensor in state.items():
        out[key] = tensor
        for base in bases:
            other = None if base is None else base.get(key)
            if isinstance(other, torch.Tensor) and bitwise_equal(other, tensor):
                out[key] = other
                break
    return out
