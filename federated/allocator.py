"""Large tensors' memory handed back to the system when they are freed, so a run's resident set follows what
it holds instead of what it once held.

torch allocates CPU tensors with the C library's ``malloc``. glibc serves a block from its heap unless the
block is at least the mmap threshold, and it raises that threshold to the size of every mapped block freed
(up to 32 MiB): after the first model-sized tensors come and go, weights, gradients, optimizer moments and
activations all land on heaps that keep their pages (per thread arena) long after the tensors are gone. A
fixed threshold keeps every block of ``LARGE_BLOCK`` bytes or more in its own mapping, returned whole on free.
A user's own ``MALLOC_MMAP_THRESHOLD_`` wins; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

__all__ = ["LARGE_BLOCK", "map_large_blocks"]

#: Blocks of this size or more get a mapping of their own: a batch's activations, weights and their moments.
#: Smaller ones stay on the heap, where a mapping per block would cost a system call each.
LARGE_BLOCK = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_done = threading.Lock()
_applied: list[bool] = []


def map_large_blocks() -> bool:
    """Fix glibc's mmap threshold at ``LARGE_BLOCK`` for this process (once); tell whether it is in force."""
    with _done:
        if not _applied:
            _applied.append(_apply())
        return _applied[0]


def _apply() -> bool:
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # glibc only: mallopt's parameters are glibc's
    except (OSError, AttributeError, TypeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK))
