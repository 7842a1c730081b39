"""The bus's documented contract: call order, filters, roles, unsubscribe handles."""

from __future__ import annotations

import pytest

from fedevents.engine.bus import ALL, EventBus
from fedevents.engine.events import RoundFinished, RoundStarted, TrainDone
from fedevents.engine.testing import EventRecorder, make_event

pytestmark = pytest.mark.anyio


def started(rnd: int) -> RoundStarted:
    return make_event(RoundStarted, round=rnd)


def done(rnd: int = 1) -> TrainDone:
    return make_event(TrainDone, round=rnd, client="c1", task="t", device="cpu", slot=0, waited_s=0.0,
                      ran_s=0.1, samples=10, metrics={"tr_acc": 0.5})


async def test_higher_priority_first_then_subscription_order() -> None:
    bus, calls = EventBus(), []
    bus.subscribe(RoundStarted, lambda e: calls.append("a0"))
    bus.subscribe(RoundStarted, lambda e: calls.append("b5"), priority=5)
    bus.subscribe(RoundStarted, lambda e: calls.append("c0"))
    bus.subscribe(RoundStarted, lambda e: calls.append("d-1"), priority=-1)
    bus.subscribe(RoundStarted, lambda e: calls.append("e5"), priority=5)
    await bus.emit(started(1))
    assert calls == ["b5", "e5", "a0", "c0", "d-1"]


async def test_sync_and_async_handlers_run_in_order_and_finish_before_emit_returns() -> None:
    bus, calls = EventBus(), []

    async def slow(e: RoundStarted) -> None:
        import anyio

        await anyio.sleep(0.01)
        calls.append("async")

    bus.subscribe(RoundStarted, slow, priority=1)
    bus.subscribe(RoundStarted, lambda e: calls.append("sync"))
    await bus.emit(started(1))
    assert calls == ["async", "sync"]


async def test_type_tuple_and_all_subscriptions_see_only_their_events() -> None:
    bus = EventBus()
    only_round, both, everything = [], [], []
    bus.subscribe(RoundStarted, only_round.append)
    bus.subscribe((RoundStarted, TrainDone), both.append)
    bus.subscribe(ALL, everything.append)
    events = [started(1), done(), make_event(RoundFinished, round=1, trained=1, failed=0, validated=0, seconds=1.0)]
    for e in events:
        await bus.emit(e)
    assert only_round == events[:1]
    assert both == events[:2]
    assert everything == events


async def test_every_once_and_predicate_filters() -> None:
    bus = EventBus()
    every2, once, pred = [], [], []
    bus.subscribe(RoundStarted, lambda e: every2.append(e.round), every=2)
    bus.subscribe(RoundStarted, lambda e: once.append(e.round), once=True)
    bus.subscribe(RoundStarted, lambda e: pred.append(e.round), filter=lambda e: e.round > 3)
    for r in range(1, 7):
        await bus.emit(started(r))
    assert every2 == [2, 4, 6]
    assert once == [1]
    assert pred == [4, 5, 6]


async def test_unsubscribe_handle_and_context_manager() -> None:
    bus, seen = EventBus(), []
    sub = bus.subscribe(RoundStarted, lambda e: seen.append(e.round))
    await bus.emit(started(1))
    sub.unsubscribe()
    sub.unsubscribe()  # harmless twice
    await bus.emit(started(2))
    with bus.subscribe(RoundStarted, lambda e: seen.append(-e.round)):
        await bus.emit(started(3))
    await bus.emit(started(4))
    assert seen == [1, -3]


async def test_decorator_form_with_and_without_types() -> None:
    bus, seen = EventBus(), []

    @bus.on(RoundStarted, priority=3)
    def first(e: RoundStarted) -> None:
        seen.append(("first", e.round))

    @bus.on()
    def anything(e) -> None:
        seen.append(("any", type(e).__name__))

    await bus.emit(started(2))
    assert seen == [("first", 2), ("any", "RoundStarted")]
    assert first.__name__ == "first"  # the decorator hands back the function


async def test_failing_sink_is_counted_and_the_rest_still_run() -> None:
    bus, after = EventBus(), []

    def broken(e: RoundStarted) -> None:
        raise RuntimeError("disk on fire")

    bus.subscribe(RoundStarted, broken, priority=1)
    bus.subscribe(RoundStarted, after.append)
    await bus.emit(started(1))
    await bus.emit(started(2))
    assert bus.sink_errors == 2
    assert [e.round for e in after] == [1, 2]


async def test_failing_work_handler_raises_out_of_emit() -> None:
    bus = EventBus()

    async def work(e: RoundStarted) -> None:
        raise ValueError("client exploded")

    bus.subscribe(RoundStarted, work, work=True)
    with pytest.raises(ValueError, match="client exploded"):
        await bus.emit(started(1))
    assert bus.sink_errors == 0
    assert bus.has_work_handler(RoundStarted)
    assert not bus.has_work_handler(TrainDone)


async def test_recorder_keeps_events_in_emission_order() -> None:
    bus = EventBus()
    rec = EventRecorder(bus)
    await bus.emit(started(1))
    await bus.emit(done(1))
    assert rec.types() == ["RoundStarted", "TrainDone"]
    assert rec.where(TrainDone, client="c1")[0].metrics == {"tr_acc": 0.5}
    rec.close()
    await bus.emit(started(2))
    assert len(rec) == 2


def test_bad_subscriptions_are_refused_with_clear_errors() -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="Event subclasses, found <class 'int'>"):
        bus.subscribe(int, print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="handler must be callable"):
        bus.subscribe(RoundStarted, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every must be an int >= 1, found 0"):
        bus.subscribe(RoundStarted, print, every=0)
