"""Helpers for testing handlers against the bus: record what was emitted, stamp events by hand."""

from __future__ import annotations

from typing import Any, Iterator, TypeVar

from .bus import ALL, EventBus, Subscription
from .context import RunContext
from .events import Event

__all__ = ["EventRecorder", "make_event"]

E = TypeVar("E", bound=Event)
_default_context = RunContext("test-run", "test")


def make_event(event_type: type[E], **fields: Any) -> E:
    """An event with a test run id and the next sequence number, for feeding a handler under test."""
    return _default_context.make(event_type, **fields)


class EventRecorder:
    """Keeps every event a bus emits, in emission order; use it in tests of handlers and experiments."""

    def __init__(self, bus: EventBus | None = None, *, priority: int = 10_000) -> None:
        self.events: list[Event] = []
        self._sub: Subscription | None = None
        if bus is not None:
            self.subscribe(bus, priority=priority)

    def subscribe(self, bus: EventBus, *, priority: int = 10_000) -> list[Subscription]:
        self._sub = bus.subscribe(ALL, self.events.append, priority=priority)
        return [self._sub]

    def close(self) -> None:
        if self._sub is not None:
            self._sub.unsubscribe()

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def of(self, event_type: type[E]) -> list[E]:
        """The recorded events of one type, in order."""
        return [e for e in self.events if isinstance(e, event_type)]

    def types(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    def where(self, event_type: type[E] = Event, **fields: Any) -> list[E]:  # type: ignore[assignment]
        """Recorded events of ``event_type`` whose fields equal ``fields``."""
        return [e for e in self.of(event_type) if all(getattr(e, k, object()) == v for k, v in fields.items())]

    def clear(self) -> None:
        self.events.clear()
