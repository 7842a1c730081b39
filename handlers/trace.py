"""The trace recorder: every event as JSON lines, and a Chrome/Perfetto trace of the device slots.

In the trace, each device is a process and each of its slots a thread; a training is a complete event
from TrainStarted to TrainDone, a validation one from ValStarted to the client's last ValDone of the round,
and round starts and aggregations are global instants. Times are microseconds since the run's first event.

Perfetto treats pid 0 and tid 0 as the kernel's idle task, so ``pid`` is the device's position in the
configured list plus one and ``tid`` is the slot index plus one; the names ("cuda:0", "slot 0") say which.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import IO, Any

from fedevents.engine.bus import ALL, EventBus, Subscription
from fedevents.engine.events import (
    Aggregated,
    ClientFailed,
    Event,
    ExperimentStarted,
    RoundFinished,
    RoundStarted,
    TrainDone,
    TrainStarted,
    ValDone,
    ValStarted,
    strict_json,
)

from .atomic import close_quietly, output_failed, trim_partial_line
from .logsink import SINK_PRIORITY, event_json

__all__ = ["TraceRecorder"]

_encode = strict_json  # strict JSON: a NaN metric is written as "NaN", never as a bare token


class TraceRecorder:
    """Writes ``events_path`` (JSON lines) and ``chrome_path`` (Chrome trace event format)."""

    def __init__(self, events_path: Path, chrome_path: Path) -> None:
        self.events_path = Path(events_path)
        self.chrome_path = Path(chrome_path)
        self._file: IO[str] | None = None
        self._t0: float | None = None
        self._last_mono = 0.0
        self._chrome: IO[str] | None = None
        self._first_chrome_event = True
        self._offset_us = 0.0
        self._pids: dict[str, int] = {}
        self._threads: set[tuple[int, int]] = set()
        self._open_train: dict[tuple[int, str], TrainStarted] = {}
        self._open_val: dict[tuple[int, str], tuple[float, dict[str, Any]]] = {}  # written at the round's end
        self._trainings: Counter[tuple[str, int]] = Counter()
        self._busy: defaultdict[tuple[str, int], float] = defaultdict(float)
        self._closed = False
        self._subs: list[Subscription] = []

    def subscribe(self, bus: EventBus, *, priority: int = SINK_PRIORITY) -> list[Subscription]:
        self._subs.append(bus.subscribe(ALL, self.handle, priority=priority))
        return self._subs[-1:]

    def handle(self, event: Event) -> None:
        try:
            self._handle(event)
        except OSError as exc:
            self._failed_write(exc)

    def _failed_write(self, exc: OSError) -> None:
        """Give both files up without a half line at their ends, and stop the run with one line."""
        close_quietly(self._file)
        close_quietly(self._chrome)
        self._file = self._chrome = None
        self._closed = True
        for path in (self.events_path, self.chrome_path):
            trim_partial_line(path)
        raise output_failed(getattr(exc, "filename", None) or self.events_path, exc)

    def _handle(self, event: Event) -> None:
        if self._file is None:
            if not isinstance(event, ExperimentStarted) or self._closed:
                return
            self._open(event)
        self._file.write(event_json(event) + "\n")  # type: ignore[union-attr]
        self._last_mono = event.mono_time
        kind = type(event)
        if kind is TrainStarted:
            self._open_train[(event.round, event.client)] = event  # type: ignore[attr-defined]
        elif kind is TrainDone:
            self._train_done(event)  # type: ignore[arg-type]
        elif kind is ValStarted:
            self._val_started(event)  # type: ignore[arg-type]
        elif kind is ValDone:
            self._val_done(event)  # type: ignore[arg-type]
        elif kind is RoundStarted:
            self._instant(f"round {event.round} started", event, {})  # type: ignore[attr-defined]
        elif kind is Aggregated:
            self._instant(f"aggregated r{event.round}", event,  # type: ignore[attr-defined]
                          {"clients": len(event.clients), "samples": event.samples, "ran_s": event.ran_s})
        elif kind is ClientFailed:
            self._client_failed(event)  # type: ignore[arg-type]
        elif kind is RoundFinished:
            self._close_validations()  # a round's validations are over when it finishes
            self._file.flush()  # type: ignore[union-attr]
            self._chrome.flush()  # type: ignore[union-attr]

    def summary(self) -> dict[str, Any]:
        """Trainings and busy seconds per (device, slot), their totals, and the makespan seen so far."""
        return {
            "trainings": dict(self._trainings),
            "busy_s": dict(self._busy),
            "total_trainings": sum(self._trainings.values()),
            "makespan_s": 0.0 if self._t0 is None else self._last_mono - self._t0,
        }

    def close(self) -> None:
        """Finish both files (the Chrome trace gets its closing bracket); safe to call more than once."""
        for sub in self._subs:
            sub.unsubscribe()
        self._closed = True
        if self._file is None:
            return
        try:
            self._close_validations()
            self._file.close()
            self._chrome.write("\n]\n")  # type: ignore[union-attr]
            self._chrome.close()  # type: ignore[union-attr]
        except OSError as exc:
            self._failed_write(exc)
        finally:
            self._file = self._chrome = None

    def _open(self, ev: ExperimentStarted) -> None:
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run continues the events and the trace of the run it resumes.
        mode = "a" if ev.resumed else "w"
        if ev.resumed:  # a run stopped by a full disk may have left half a line
            trim_partial_line(self.events_path)
        self._file = open(self.events_path, mode, encoding="utf-8", buffering=1 << 16)
        self._t0 = ev.mono_time
        self._chrome = self._open_chrome(ev.resumed)
        for device in ev.devices:
            self._pid(device)

    def _open_chrome(self, resumed: bool) -> IO[str]:
        """The trace as a JSON array, appended to as spans end, so a long run keeps none of it in memory.

        The trace event format allows the closing ``]`` to be missing, so the trace of a run that died
        still opens. A resumed run appends after the spans it finds, its clock shifted to start after them.
        """
        if resumed and self.chrome_path.exists():
            text = self.chrome_path.read_text(encoding="utf-8").rstrip()
            text = text[:-1].rstrip() if text.endswith("]") else text.rstrip(",")
            try:
                earlier = json.loads(text + "]") if text.startswith("[") else []
            except ValueError:
                earlier = None
            if earlier is not None:
                ends = [e.get("ts", 0) + e.get("dur", 0) for e in earlier if isinstance(e, dict)]
                self._offset_us = max(ends, default=0.0) + 1e6  # a one-second gap marks the restart
                self._first_chrome_event = not earlier
                chrome = open(self.chrome_path, "w", encoding="utf-8", buffering=1 << 16)
                chrome.write(text)
                return chrome
        chrome = open(self.chrome_path, "w", encoding="utf-8", buffering=1 << 16)
        chrome.write("[")
        return chrome

    def _put(self, event: dict[str, Any]) -> None:
        self._chrome.write(("\n" if self._first_chrome_event else ",\n") + _encode(event))  # type: ignore[union-attr]
        self._first_chrome_event = False

    def _close_validations(self) -> None:
        for _, span in self._open_val.values():
            self._put(span)
        self._open_val.clear()

    def _us(self, mono: float) -> float:
        return round((mono - self._t0) * 1e6 + self._offset_us, 3)  # type: ignore[operator]

    def _pid(self, device: str) -> int:
        pid = self._pids.get(device)
        if pid is None:
            pid = self._pids[device] = len(self._pids) + 1
            self._put({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": device}})
            self._put({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        return pid

    def _where(self, device: str, slot: int) -> tuple[int, int]:
        pid, tid = self._pid(device), slot + 1
        if (pid, tid) not in self._threads:
            self._threads.add((pid, tid))
            self._put({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": f"slot {slot}"}})
            self._put({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        return pid, tid

    def _span(self, name: str, cat: str, start: float, end: float, device: str, slot: int,
              args: dict[str, Any], *, write: bool = True) -> dict[str, Any]:
        pid, tid = self._where(device, slot)
        span = {"ph": "X", "name": name, "cat": cat, "ts": self._us(start),
                "dur": round(max(end - start, 0.0) * 1e6, 3), "pid": pid, "tid": tid, "args": args}
        if write:
            self._put(span)
        return span

    def _train_done(self, ev: TrainDone) -> None:
        started = self._open_train.pop((ev.round, ev.client), None)
        start = started.mono_time if started is not None else ev.mono_time - ev.ran_s
        self._span(f"train {ev.client} r{ev.round}", "train", start, ev.mono_time, ev.device, ev.slot,
                   {"task": ev.task, "waited_s": ev.waited_s, "samples": ev.samples, "metrics": dict(ev.metrics)})
        self._trainings[(ev.device, ev.slot)] += 1
        self._busy[(ev.device, ev.slot)] += ev.mono_time - start

    def _val_started(self, ev: ValStarted) -> None:
        span = self._span(f"val {ev.client} r{ev.round}", "val", ev.mono_time, ev.mono_time, ev.device, ev.slot,
                          {"waited_s": ev.waited_s, "metrics": {}}, write=False)
        self._open_val[(ev.round, ev.client)] = (ev.mono_time, span)

    def _val_done(self, ev: ValDone) -> None:
        key = (ev.round, ev.client)
        if key not in self._open_val:
            start = ev.mono_time - ev.ran_s
            span = self._span(f"val {ev.client} r{ev.round}", "val", start, ev.mono_time, ev.device, ev.slot,
                              {"metrics": {}}, write=False)
            self._open_val[key] = (start, span)
        start, span = self._open_val[key]
        # The span grows to the client's last ValDone of the round.
        span["dur"] = round(max(ev.mono_time - start, 0.0) * 1e6, 3)
        span["args"]["metrics"][ev.task] = dict(ev.metrics)

    def _instant(self, name: str, ev: Event, args: dict[str, Any]) -> None:
        self._put({"ph": "i", "s": "g", "name": name, "ts": self._us(ev.mono_time),
                   "pid": 1, "tid": 1, "args": {"round": ev.round, **args}})  # type: ignore[attr-defined]

    def _client_failed(self, ev: ClientFailed) -> None:
        started = self._open_train.pop((ev.round, ev.client), None)
        if started is not None and ev.phase == "train":
            self._span(f"train {ev.client} r{ev.round} (failed)", "train", started.mono_time, ev.mono_time,
                       started.device, started.slot, {"task": ev.task, "error": f"{ev.error_type}: {ev.error}"})
        opened = self._open_val.get((ev.round, ev.client))
        if opened is not None and ev.phase == "validate":
            opened[1]["args"]["error"] = f"{ev.error_type}: {ev.error}"
