"""torch's intra-op thread count, set in the thread that runs torch work."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

__all__ = ["with_threads", "in_threads"]

T = TypeVar("T")


def with_threads(threads: int, call: Callable[[], T]) -> T:
    """Run ``call`` with torch using ``threads`` intra-op threads in the calling thread."""
    # torch's thread count is a per-thread OpenMP setting: set in the event loop's thread it does not reach
    # anyio's workers, and a fresh worker starts a team as large as the machine. Several such teams on the
    # same cores made CPU training 4x slower than one thread (docs/benchmarks.md), and a reduction split
    # over another number of threads changes the last bits of its result, so the count is set wherever
    # torch runs, from the config (never derived from `parallel`).
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return call()


def in_threads(method: Callable[..., T]) -> Callable[..., T]:
    """Run a method of an object with a ``threads`` attribute under ``with_threads(self.threads, ...)``."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> T:
        return with_threads(self.threads, lambda: method(self, *args, **kwargs))

    return call
