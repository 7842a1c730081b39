"""The device pool: ``parallel`` slots on each device, each device's slots counted by a CapacityLimiter.

A request gets a slot on the least-loaded device (most free slots; ties go to the device listed first) and
the lowest free slot index there. When no device has room, requests wait in one first-come, first-served
queue; an exclusive request (every slot of one device) waits in the same queue, and nobody overtakes it, so
it cannot starve. A slot is returned on every exit path, cancellation included.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import anyio

__all__ = ["DevicePool", "Slot"]


@dataclass(frozen=True, slots=True)
class Slot:
    """A granted place to run work: ``device``, its slot ``indices`` and how long the request waited."""

    device: str
    indices: tuple[int, ...]
    waited_s: float

    @property
    def index(self) -> int:
        """The first (for a shared slot, the only) slot index."""
        return self.indices[0]


class _Request:
    __slots__ = ("exclusive", "granted", "ready")

    def __init__(self, exclusive: bool) -> None:
        self.exclusive = exclusive
        self.granted: tuple[str, tuple[int, ...]] | None = None
        self.ready = anyio.Event()


class DevicePool:
    """Hands out device slots to concurrent work, never more than ``parallel`` per device."""

    def __init__(self, devices: Sequence[str], parallel: int) -> None:
        if isinstance(parallel, bool) or not isinstance(parallel, int):
            raise TypeError(f"parallel must be an int, found {type(parallel).__name__}")
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, found {parallel}")
        if not devices:
            raise ValueError("devices must name at least one device")
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices must be distinct, found {list(devices)}")
        self.devices: tuple[str, ...] = tuple(devices)
        self.parallel = parallel
        self._limiters = {d: anyio.CapacityLimiter(parallel) for d in self.devices}
        self._free: dict[str, list[int]] = {d: list(range(parallel)) for d in self.devices}
        self._queue: deque[_Request] = deque()

    @property
    def total_slots(self) -> int:
        return self.parallel * len(self.devices)

    def in_use(self, device: str) -> int:
        """How many slots of ``device`` are held right now (read from its limiter)."""
        return int(self._limiters[device].borrowed_tokens)

    @asynccontextmanager
    async def slot(self, *, exclusive: bool = False) -> AsyncIterator[Slot]:
        """Hold one slot (or, with ``exclusive``, every slot of one device) for the ``async with`` body."""
        held = await self.acquire(exclusive=exclusive)
        try:
            yield held
        finally:
            self.release(held)

    async def acquire(self, *, exclusive: bool = False) -> Slot:
        """Wait for a slot and take it; the caller must ``release`` it exactly once, from the event loop."""
        asked = time.monotonic()
        request = _Request(exclusive)
        self._queue.append(request)
        self._grant()
        try:
            await request.ready.wait()
        except BaseException:
            if request.granted is None:
                self._queue.remove(request)
            else:
                self._release(*request.granted)
            raise
        device, indices = request.granted  # type: ignore[misc]
        return Slot(device, indices, time.monotonic() - asked)

    def release(self, slot: Slot) -> None:
        """Give a slot back and wake whoever waits first."""
        self._release(slot.device, slot.indices)

    def _grant(self) -> None:
        # Strict first come, first served: stop at the first request that does not fit.
        while self._queue:
            request = self._queue[0]
            device = self._pick(request.exclusive)
            if device is None:
                return
            self._queue.popleft()
            take = self.parallel if request.exclusive else 1
            indices = tuple(self._free[device][:take])
            del self._free[device][:take]
            for i in indices:
                self._limiters[device].acquire_on_behalf_of_nowait((device, i))
            request.granted = (device, indices)
            request.ready.set()

    def _pick(self, exclusive: bool) -> str | None:
        best: str | None = None
        for device in self.devices:
            free = len(self._free[device])
            if exclusive and free < self.parallel:
                continue
            if free and (best is None or free > len(self._free[best])):
                best = device
        return best

    def _release(self, device: str, indices: tuple[int, ...]) -> None:
        for i in indices:
            self._limiters[device].release_on_behalf_of((device, i))
        self._free[device].extend(indices)
        self._free[device].sort()
        self._grant()
