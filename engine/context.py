"""The run context: the identity of one run and the stamp every event of it carries."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from .events import Event

__all__ = ["RunContext", "new_run_id"]

E = TypeVar("E", bound=Event)


def new_run_id(exp_name: str) -> str:
    """``<exp>-<YYYYmmdd-HHMMSS>-<6 hex>``: sortable by start time, unique for runs started together."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime())
    return f"{exp_name}-{stamp}-{os.urandom(3).hex()}"


@dataclass
class RunContext:
    """Makes events of one run: fills in run id, experiment name, sequence number and both clocks."""

    run_id: str
    exp_name: str
    _seq: Any = field(default_factory=lambda: itertools.count(1), repr=False)
    #: Work that goes on after the event that began it was handled (a checkpoint written while the next
    #: round trains): the run awaits each of these before its last event, so that event sees it done.
    settle: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)

    def make(self, event_type: type[E], **fields: Any) -> E:
        return event_type(
            run_id=self.run_id,
            exp_name=self.exp_name,
            seq=next(self._seq),
            wall_time=time.time(),
            mono_time=time.monotonic(),
            **fields,
        )
