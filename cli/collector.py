"""Python's cyclic garbage collector around a run of the command: off while torch is imported and the
experiments are built, and blind to everything built by then while each experiment runs.

A process with torch holds about 200,000 objects the collector tracks (modules, functions, classes), none of
which ever becomes garbage, and each full collection walks all of them: 15-170 ms each, three during the
imports and more as a run's events and records accumulate. Freezing them (``gc.freeze``) takes them out of
every later collection, which then costs what the run itself allocated (docs/benchmarks.md, *Start-up
without rich, and the collector paused and frozen*).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from typing import Iterator

__all__ = ["Paused", "collector_paused", "frozen_heap"]


@dataclasses.dataclass
class Paused:
    """What ``collector_paused`` did: whether it froze what the block made (``thaw`` hands that back)."""

    froze: bool = False

    def thaw(self) -> None:
        if self.froze:
            gc.unfreeze()
            self.froze = False


@contextlib.contextmanager
def collector_paused(*, then_freeze: bool = False) -> Iterator[Paused]:
    """No automatic collection within the block (imports and building make little garbage); the collector's
    state is restored after it, so a process that had turned it off keeps it off.

    ``then_freeze``: when the block ends without an error, everything alive is frozen before the collector is
    turned back on. Turned on first, it would at once collect the young generation, which then holds all the
    block made (torch's modules: about 230,000 objects, 90 ms), only to keep every one of them.
    """
    enabled = gc.isenabled()
    paused = Paused()
    gc.disable()
    try:
        yield paused
        if enabled and then_freeze:
            gc.freeze()
            paused.froze = True
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def frozen_heap(*, collect_first: bool = False) -> Iterator[None]:
    """Every object alive at the start of the block is left out of the collections within it, and handed back
    to the collector at its end, so what a finished experiment leaves is collected as usual.

    ``collect_first``: collect before freezing (after an earlier experiment of the same command, whose
    garbage would otherwise be frozen, and kept, for the whole of this one).
    """
    if not gc.isenabled():  # a process that turned the collector off
        yield
        return
    if collect_first:
        gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
