"""The executor contract: where a client's job runs once the client-work handler has given it a slot."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from fedevents.engine.devices import Slot

__all__ = ["Executor", "WorkerLost"]


class WorkerLost(RuntimeError):
    """The process, actor or node running a client's job went away before answering."""


class Executor:
    """Runs train and validation jobs; the client-work handler calls it from worker threads.

    ``train`` and ``validate`` block until the job's result is back (the handler runs them in a worker
    thread, so the event loop never waits); an ``inline`` executor is cheap enough to be called on the
    event loop itself (the dry run). ``stop`` asks the job running on a slot to end early (its time ran
    out); the handler keeps the slot until ``train``/``validate`` has returned or raised.
    """

    name: ClassVar[str]
    inline: ClassVar[bool] = False

    def devices(self) -> Sequence[str] | None:
        """The devices slots are made for, when the executor discovers them (a cluster); else None."""
        return None

    def ready(self, slot: Slot) -> bool:
        """Whether ``slot`` can take a job now; if not, ``prepare(slot)`` is called first."""
        return True

    def prepare(self, slot: Slot) -> None:
        """Make ``slot`` ready (start its worker); blocking, in a worker thread, outside the client's time."""

    def train(self, job: Any, slot: Slot) -> Any:
        raise NotImplementedError

    def validate(self, job: Any, slot: Slot) -> Any:
        raise NotImplementedError

    def stop(self, slot: Slot) -> None:
        """End the job on ``slot`` early if this executor can; by default it runs to its end."""

    def close(self) -> None:
        """Release workers and connections; called once after the run, on every exit path."""
