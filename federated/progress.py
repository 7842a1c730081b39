"""Progress inside one client's work, told by the training loop to whoever listens, with no event on the bus.

The bus stays off the inner loops: a training reports each finished epoch through ``report_epoch``, which
calls the listener set for the current context by ``reporting_to`` (the client-work handler sets one around
each job it runs in a worker thread) and does nothing when none is set. Context variables follow
``anyio.to_thread.run_sync`` into the worker thread, so the listener is the one of the client being trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["EpochListener", "report_epoch", "reporting_to"]

#: ``listener(done, total)``: ``done`` of ``total`` epochs finished; called from the training thread.
EpochListener = Callable[[int, int], None]

_listener: ContextVar[EpochListener | None] = ContextVar("fedevents_epoch_listener", default=None)


def report_epoch(done: int, total: int) -> None:
    """Tell the current listener, if any, that ``done`` of ``total`` epochs are finished."""
    listener = _listener.get()
    if listener is not None:
        listener(done, total)


@contextmanager
def reporting_to(listener: EpochListener | None) -> Iterator[None]:
    """Within the block, ``report_epoch`` calls ``listener``."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
