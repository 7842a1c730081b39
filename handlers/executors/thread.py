"""The default executor: each job runs in the worker thread the client-work handler gave it."""

from __future__ import annotations

from typing import Any, Callable

from fedevents.engine.devices import Slot
from fedevents.federated.threads import with_threads

from .base import Executor

__all__ = ["ThreadExecutor"]


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
