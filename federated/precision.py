"""Mixed precision (``exp_opts.precision: bf16``): a model's forward passes run under torch's autocast in
bfloat16, while its weights, gradients, optimizer state and every stored state stay in float32.

Only the forward pass of the model (and a method's own training forward, FedSTIL's) is cast, and what it
returns comes back in float32: the loss, a method's penalty, the accuracy and the ReID distances and ranks are
then computed in float32 as in a float32 run, which keeps bfloat16's 8-bit mantissa out of the loss and the
metrics. bfloat16 has float32's range, so no loss scaling is needed (float16 would need it; it is not offered).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fedevents.engine.config import PRECISIONS

__all__ = ["PRECISIONS", "as_float32", "check_precision", "forward_precision", "precision_call"]

#: The first CUDA compute capability with bfloat16 arithmetic (Ampere); older GPUs only emulate it, slower
#: than float32.
BF16_CAPABILITY = (8, 0)

_REDUCED = (torch.bfloat16, torch.float16)


def check_precision(precision: str, device: str) -> None:
    """Raise ``ValueError`` unless ``device`` (a name ``check_device`` accepted) computes in ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"exp_opts.precision: expected one of {', '.join(PRECISIONS)}, found {precision!r}")
    where = torch.device(device)  # a name check_device accepted: torch parses it the same way
    if precision != "bf16" or where.type != "cuda":
        return
    capability = tuple(torch.cuda.get_device_capability(where.index or 0))
    if capability < BF16_CAPABILITY:
        need = ".".join(map(str, BF16_CAPABILITY))
        raise ValueError(f"exp_opts.precision bf16: expected a device with bfloat16 arithmetic (the CPU, or CUDA "
                         f"compute capability {need} or newer), found {device} with "
                         f"{'.'.join(map(str, capability))}")


@contextlib.contextmanager
def forward_precision(model: nn.Module, device: torch.device, precision: str) -> Iterator[None]:
    """Within the block, calls of ``model`` run its forward pass in ``precision`` on ``device`` and give their
    floating-point outputs in float32; nothing changes for ``fp32``.

    Done with a pair of hooks on ``model`` (not by replacing its ``forward``), so a copy of the model made in
    the block (iCaRL's previous model) runs its own weights, cast the same way.
    """
    if precision == "fp32":
        yield
        return
    entered: list[torch.autocast] = []

    def enter(module: nn.Module, args: Any) -> None:
        cast = torch.autocast(device.type, dtype=torch.bfloat16)
        cast.__enter__()
        entered.append(cast)

    def leave(module: nn.Module, args: Any, output: Any) -> Any:
        if entered:  # always called, also after a forward that raised
            entered.pop().__exit__(None, None, None)
        return as_float32(output)

    # First of the model's hooks on both sides: other hooks see what the forward gives back, in float32.
    handles = [model.register_forward_pre_hook(enter, prepend=True),
               model.register_forward_hook(leave, prepend=True, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while entered:
            entered.pop().__exit__(None, None, None)


def precision_call(fn: Callable[..., Any], device: torch.device, precision: str) -> Callable[..., Any]:
    """``fn``, a forward function of a method's own (FedSTIL trains the network after its head on
    prototypes), run as the model's forward runs under ``precision``: under autocast, its floating-point
    outputs given back in float32. ``fn`` itself for ``fp32``."""
    if precision == "fp32":
        return fn

    def call(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = fn(*args, **kwargs)
        return as_float32(out)

    return call


def as_float32(value: Any) -> Any:
    """``value`` with each reduced-precision floating tensor in it (in tuples, lists and dicts) as float32; any
    other value as it is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _REDUCED else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(as_float32(v) for v in value)
    if isinstance(value, tuple):  # a named tuple keeps its type
        return type(value)(*(as_float32(v) for v in value))
    if isinstance(value, list):
        return [as_float32(v) for v in value]
    if isinstance(value, dict):
        return {k: as_float32(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a method's ModelOutput
        return dataclasses.replace(value, **{f.name: as_float32(getattr(value, f.name))
                                            for f in dataclasses.fields(value) if f.init})
    return value
