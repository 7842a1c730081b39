"""The device pool: bounded concurrency, placement, FIFO waiting, exclusive use, release on every path."""

from __future__ import annotations

import anyio
import pytest

from fedevents.engine.devices import DevicePool

pytestmark = pytest.mark.anyio


async def test_ten_clients_on_two_devices_by_two_slots_never_exceed_four_or_share_a_slot() -> None:
    pool = DevicePool(["cuda:0", "cuda:1"], parallel=2)
    running: set[tuple[str, int]] = set()
    peak, seen_double, placements = 0, [], []
    may_finish = anyio.Event()

    async def client(i: int) -> None:
        nonlocal peak
        async with pool.slot() as slot:
            key = (slot.device, slot.index)
            if key in running:
                seen_double.append(key)
            running.add(key)
            placements.append(key)
            peak = max(peak, len(running))
            assert pool.in_use(slot.device) <= 2
            if len(placements) == 4:
                may_finish.set()
            await may_finish.wait()
            await anyio.sleep(0)
            running.discard(key)

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(client, i)
    assert peak == 4
    assert seen_double == []
    assert len(placements) == 10
    assert pool.in_use("cuda:0") == pool.in_use("cuda:1") == 0


async def test_least_loaded_device_first_and_ties_go_to_the_first_listed() -> None:
    pool = DevicePool(["cpu", "cuda:0"], parallel=2)
    got = []
    async with pool.slot() as a:
        got.append((a.device, a.index))
        async with pool.slot() as b:
            got.append((b.device, b.index))
            async with pool.slot() as c:
                got.append((c.device, c.index))
    assert got == [("cpu", 0), ("cuda:0", 0), ("cpu", 1)]


async def test_waiters_are_served_first_come_first_served() -> None:
    pool = DevicePool(["cpu"], parallel=1)
    order: list[int] = []
    release = anyio.Event()

    async def holder() -> None:
        async with pool.slot():
            await release.wait()

    async def waiter(i: int) -> None:
        async with pool.slot() as slot:
            order.append(i)
            assert slot.waited_s >= 0.0

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await anyio.wait_all_tasks_blocked()
        for i in range(5):
            tg.start_soon(waiter, i)
            await anyio.wait_all_tasks_blocked()
        release.set()
    assert order == [0, 1, 2, 3, 4]


async def test_exclusive_takes_every_slot_of_one_device_and_is_not_overtaken() -> None:
    pool = DevicePool(["cpu"], parallel=3)
    log: list[str] = []
    first_out = anyio.Event()

    async def shared(name: str, wait: anyio.Event | None) -> None:
        async with pool.slot():
            log.append(f"{name} in")
            if wait is not None:
                await wait.wait()
            log.append(f"{name} out")

    async def exclusive() -> None:
        async with pool.slot(exclusive=True) as slot:
            log.append(f"exclusive in {slot.indices}")
            assert pool.in_use("cpu") == 3

    async with anyio.create_task_group() as tg:
        tg.start_soon(shared, "a", first_out)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(exclusive)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(shared, "late", None)  # must queue behind the exclusive request
        await anyio.wait_all_tasks_blocked()
        first_out.set()
    assert log == ["a in", "a out", "exclusive in (0, 1, 2)", "late in", "late out"]


async def test_slot_returned_when_body_raises_or_waiter_is_cancelled() -> None:
    pool = DevicePool(["cpu"], parallel=1)
    with pytest.raises(RuntimeError):
        async with pool.slot():
            raise RuntimeError("training failed")
    assert pool.in_use("cpu") == 0

    async with pool.slot():
        with anyio.move_on_after(0.01):
            async with pool.slot():
                pytest.fail("a full pool handed out a second slot")
        assert pool.in_use("cpu") == 1
    assert pool.in_use("cpu") == 0
    async with pool.slot() as again:  # the cancelled waiter left no ghost in the queue
        assert again.index == 0


def test_bad_pool_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="parallel must be >= 1, found 0"):
        DevicePool(["cpu"], 0)
    with pytest.raises(TypeError, match="parallel must be an int, found float"):
        DevicePool(["cpu"], 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one device"):
        DevicePool([], 1)
    with pytest.raises(ValueError, match="distinct"):
        DevicePool(["cpu", "cpu"], 1)
