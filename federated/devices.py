"""Checks that a device name from a config names a device this machine has."""

from __future__ import annotations

import re

import torch

__all__ = ["check_device"]

_CUDA_NAME = re.compile(r"cuda(?::(\d+))?")


def check_device(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is ``cpu`` or a CUDA device present on this machine."""
    if not isinstance(name, str):
        raise TypeError(f"device: expected a str such as 'cpu' or 'cuda:0', found {type(name).__name__}")
    if name == "cpu":
        return
    match = _CUDA_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"device {name!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    index = int(match.group(1) or 0)
    if index >= count:
        have = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count))])
        raise ValueError(
            f"device {name!r}: expected a device this machine has ({have}), found {count} CUDA devices"
        )
