"""Memory freed by torch's CPU tensors given back to the system, so a run's resident set follows what it holds
rather than the most it ever held.

torch allocates CPU tensors with the C library's ``malloc``. glibc gives each thread that allocates under
contention a heap (arena) of its own, and memory freed into one arena serves only the threads on it: a run
that trains in one thread, commits and aggregates in another and writes checkpoints in a third keeps the
peak of each. And since glibc raises its mmap threshold to the size of every mapped block freed, after the
first model-sized tensors come and go even weights, gradients and optimizer moments land on those heaps,
which keep their pages when they are freed. So: one arena per process (``share_one_heap``, before the
run's threads allocate), and the free pages handed back after each job (``release_free_pages``), where it
costs one call per job instead of a system call per tensor (a fixed mmap threshold cost 30 % of a
training step's CPU time). A user's own ``MALLOC_ARENA_MAX`` wins; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

__all__ = ["RELEASE_FROM", "release_free_pages", "share_one_heap"]

#: Jobs on models smaller than this free too little to matter, and a release costs up to a millisecond.
RELEASE_FROM = 8 << 20

_M_ARENA_MAX = -8  # glibc's malloc.h
_lock = threading.Lock()
_glibc: list[ctypes.CDLL | None] = []


def share_one_heap() -> bool:
    """Let every thread of this process allocate from one glibc arena; tell whether it is in force."""
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 1))


def release_free_pages(model_bytes: int) -> None:
    """Give the pages of freed blocks back to the system after a job on a model of ``model_bytes`` (nothing
    for a model under ``RELEASE_FROM``, or without glibc)."""
    libc = _libc() if model_bytes >= RELEASE_FROM else None
    if libc is not None:
        libc.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    with _lock:
        if not _glibc:
            _glibc.append(_load())
        return _glibc[0]


def _load() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # glibc only: mallopt's parameters and malloc_trim are glibc's
    except (OSError, AttributeError, TypeError):
        return None
    return libc
