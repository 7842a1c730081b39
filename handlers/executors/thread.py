"""The default executor: each job runs in the worker thread the client-work handler gave it."""

from __future__ import annotations

from typing import Any, Callable

import torch
from fedevents.engine.devices import Slot

from .base import Executor

__all__ = ["ThreadExecutor", "with_threads"]


def with_threads(threads: int, call: Callable[[], Any]) -> Any:
    """Run ``call`` with torch using ``threads`` intra-op threads in the calling thread."""
    # torch's thread count is a per-thread OpenMP setting: set in the event loop's thread it does not reach
    # anyio's workers, and each worker would start a team as large as the machine. Several such teams on
    # the same cores made CPU training 4x slower than on one thread (docs/benchmarks.md). The count is a
    # config key, never derived from `parallel`: it changes the last bits of float reductions.
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return call()


class ThreadExecutor(Executor):
    """Jobs run in this process on one shared ``Worker``: right for GPUs, where the GIL is released while
    kernels run, and for models large enough that per-batch Python is a small part of a step."""

    name = "thread"

    def __init__(self, worker: Any, *, torch_threads: int = 1) -> None:
        self.worker = worker
        self.threads = torch_threads

    def train(self, job: Any, slot: Slot) -> Any:
        return with_threads(self.threads, lambda: self.worker.train(job))

    def validate(self, job: Any, slot: Slot) -> Any:
        return with_threads(self.threads, lambda: self.worker.validate(job))
