"""The event bus: typed subscriptions, a documented call order, and isolation of failing sinks.

Call order for one event: handlers with a higher ``priority`` run first; among equal priorities, the one
subscribed first runs first. Every handler of an event finishes before ``emit`` returns, and they run one
after another, never concurrently, so a sync handler sees events one at a time on the event-loop thread.

Two roles:
- a *sink* (the default) observes. If it raises, the error is logged with the event, counted in
  ``bus.sink_errors``, and the remaining handlers still run. Whatever it raises is its failure
  (``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``, an exception group, a cancellation of its
  own making), except a cancellation of the run and, without fedevents' signal handling, the user's
  Ctrl-C. An async sink that runs longer than ``bus.time_limit_s`` is cancelled and reported by name,
  the same way.
- a *work* handler (``work=True``) does the experiment's work. If it raises, ``emit`` raises too, and the
  engine turns that into a failed client (anything that is not an ``Exception`` as ``HandlerFailed``).

One failure is never isolated: a sink that cannot write one of the run's files raises ``OutputError``.
``emit`` raises it at once (the handlers after it, such as the checkpoint, do not run), keeps it in
``bus.output_error`` for the engine, and from then on skips that sink and ignores further write errors, so
the end of the run is reported once and nothing tries to log it to the disk that failed.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Union

import anyio
import structlog

from .errors import HandlerFailed, OutputError, describe, message, one_line
from .events import Event

__all__ = ["ALL", "EventBus", "Subscription", "Handler"]

Handler = Callable[[Event], Union[None, Awaitable[None]]]
Predicate = Callable[[Event], bool]


class _All:
    """Marker: subscribe to every event type."""

    def __repr__(self) -> str:
        return "ALL"


ALL = _All()

_log = structlog.get_logger("fedevents.bus")


@dataclass(eq=False, slots=True)
class Subscription:
    """A handle on one subscription; ``unsubscribe()`` (or ``with``) removes it."""

    types: tuple[type[Event], ...] | None
    handler: Handler
    priority: int
    work: bool
    every: int | None
    once: bool
    filter: Predicate | None
    order: int
    is_async: bool
    broken: bool = False  # the sink could not write its file; it gets no more events
    filtered: bool = False  # ``every`` or ``filter`` may turn away an event of a matching type
    _bus: "EventBus | None" = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self._bus is not None

    def unsubscribe(self) -> None:
        """Remove the handler; calling it twice is harmless."""
        if self._bus is not None:
            self._bus._remove(self)
            self._bus = None

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()

    def matches(self, event: Event) -> bool:
        """Whether ``event`` is of a subscribed type and passes the filters."""
        if self.types is not None and not isinstance(event, self.types):
            return False
        return self.passes(event)

    def passes(self, event: Event) -> bool:
        """Whether an event of a subscribed type passes ``every`` and ``filter``."""
        if self.every is not None:
            rnd = getattr(event, "round", None)
            if rnd is None or rnd % self.every != 0:
                return False
        return self.filter is None or bool(self.filter(event))


class EventBus:
    """Routes each emitted event to the handlers subscribed to its type."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._cache: dict[type[Event], list[Subscription]] = {}
        self._counter = itertools.count()
        self.sink_errors = 0
        #: The first OutputError a sink raised; the run must stop when it is set.
        self.output_error: OutputError | None = None
        #: Seconds a sink may take for one event (None: no limit); set from ``exp_opts.handler_timeout_s``.
        self.time_limit_s: float | None = None

    def subscribe(
        self,
        types: type[Event] | Iterable[type[Event]] | _All,
        handler: Handler,
        *,
        priority: int = 0,
        work: bool = False,
        every: int | None = None,
        once: bool = False,
        filter: Predicate | None = None,
    ) -> Subscription:
        """Call ``handler(event)`` for every emitted event of ``types`` that passes the filters.

        ``every=N`` keeps events whose ``round`` is a multiple of N (events without a round are skipped);
        ``once=True`` removes the subscription after its first call; ``filter`` is any predicate.
        """
        if not callable(handler):
            raise TypeError(f"handler must be callable, found {type(handler).__name__}")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be an int >= 1, found {every!r}")
        sub = Subscription(
            types=_normalise_types(types),
            handler=handler,
            priority=priority,
            work=work,
            every=every,
            once=once,
            filter=filter,
            order=next(self._counter),
            is_async=_is_async(handler),
            filtered=every is not None or filter is not None,
            _bus=self,
        )
        self._subs.append(sub)
        self._subs.sort(key=lambda s: (-s.priority, s.order))
        self._cache.clear()
        return sub

    def on(self, types: type[Event] | Iterable[type[Event]] | _All = ALL, **options: Any) -> Callable[[Handler], Handler]:
        """Decorator form of ``subscribe``: ``@bus.on(TrainDone, priority=5)``; bare ``@bus.on()`` takes all."""

        def register(handler: Handler) -> Handler:
            self.subscribe(types, handler, **options)
            return handler

        return register

    def handlers_for(self, event_type: type[Event]) -> list[Subscription]:
        """The subscriptions an event of ``event_type`` would reach, in call order (before filters)."""
        subs = self._cache.get(event_type)
        if subs is None:
            subs = [s for s in self._subs if s.types is None or issubclass(event_type, s.types)]
            self._cache[event_type] = subs
        return subs

    def has_work_handler(self, event_type: type[Event]) -> bool:
        return any(s.work for s in self.handlers_for(event_type))

    async def emit(self, event: Event) -> None:
        """Run every matching handler, in call order, and return when all are done."""
        # handlers_for has matched the type already; a sync sink is called without a coroutine of its own,
        # since every event goes through every sink.
        for sub in self.handlers_for(type(event)):
            if sub._bus is None or sub.broken or (sub.filtered and not sub.passes(event)):
                continue
            if sub.once:
                sub.unsubscribe()
            if sub.work:
                try:
                    result = sub.handler(event)
                    if sub.is_async:
                        await result  # type: ignore[misc]
                except BaseException as exc:
                    if isinstance(exc, Exception) or _passes_through(exc):
                        raise
                    raise HandlerFailed(_own_exit(sub, exc)) from None
                continue
            try:
                if sub.is_async:
                    await self._call_async_sink(sub, event)
                else:
                    self._call_sync_sink(sub, event)
            except OutputError as exc:
                sub.broken = True
                if self.output_error is None:  # the first one stops the run; later ones are its echoes
                    self.output_error = exc
                    raise
            except BaseException as exc:  # a sink must never stop training, whatever it raises
                if _passes_through(exc):
                    raise
                self._sink_failed(sub, event, exc)

    def _call_sync_sink(self, sub: Subscription, event: Event) -> None:
        limit = self.time_limit_s
        if limit is None:
            sub.handler(event)
            return
        began = time.monotonic()
        sub.handler(event)
        took = time.monotonic() - began
        if took > limit:  # a sync handler cannot be stopped, only reported
            raise TimeoutError(f"took {took:.1f}s, over exp_opts.handler_timeout_s = {limit:g}s")

    async def _call_async_sink(self, sub: Subscription, event: Event) -> None:
        limit = self.time_limit_s
        result = sub.handler(event)
        if limit is None:
            await result  # type: ignore[misc]
            return
        with anyio.move_on_after(limit) as scope:
            await result  # type: ignore[misc]
        if scope.cancelled_caught:
            raise TimeoutError(f"cancelled after exp_opts.handler_timeout_s = {limit:g}s")

    def _sink_failed(self, sub: Subscription, event: Event, exc: BaseException) -> None:
        self.sink_errors += 1
        _log.error(
            "sink failed",
            handler=_name(sub.handler),
            failed_event=type(event).__name__,
            failed_seq=event.seq,
            error=describe(exc),
        )

    def _remove(self, sub: Subscription) -> None:
        self._subs.remove(sub)
        self._cache.clear()


def _normalise_types(types: object) -> tuple[type[Event], ...] | None:
    if isinstance(types, _All):
        return None
    if isinstance(types, type):
        types = (types,)
    try:
        found = tuple(types)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"types must be an Event subclass, a tuple of them or ALL, found {types!r}") from None
    for t in found:
        if not (isinstance(t, type) and issubclass(t, Event)):
            raise TypeError(f"types must be Event subclasses, found {t!r}")
    if not found:
        raise ValueError("types must name at least one Event subclass")
    return found


def _is_async(handler: Handler) -> bool:
    call = getattr(handler, "__call__", None)
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


def _name(handler: object) -> str:
    return getattr(handler, "__qualname__", None) or type(handler).__qualname__


def _passes_through(exc: BaseException) -> bool:
    """Whether what a handler raised is not its own failure but the run's: the user's Ctrl-C, or a
    cancellation of the scope the handler runs in."""
    return _real_interrupt(exc) or _real_cancellation(exc)


def _real_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is a cancellation the event loop delivered, not one a handler raised by itself.

    On asyncio a delivered cancellation leaves its task cancelling; an ``asyncio.CancelledError()`` a
    handler raises does not (Python 3.10 cannot tell them apart: there every one passes). On trio only
    trio itself can make a ``Cancelled``.
    """
    if not isinstance(exc, anyio.get_cancelled_exc_class()):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not running on asyncio
        return True
    cancelling = getattr(task, "cancelling", None)  # Python 3.11 and later
    return cancelling is None or cancelling() > 0


def _real_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt may be the user's Ctrl-C rather than a handler's own: only while SIGINT
    still raises it (the CLI's signal handling replaces that), since Python raises it wherever it lands."""
    return isinstance(exc, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _own_exit(sub: Subscription, exc: BaseException) -> str:
    return f"handler {_name(sub.handler)} raised {type(exc).__name__}({one_line(message(exc))})"
