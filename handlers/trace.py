"""The trace recorder: every event as JSON lines, and a Chrome/Perfetto trace of the device slots.

In the trace, each device is a process and each of its slots a thread; a training is a complete event
from TrainStarted to TrainDone, a validation one from ValStarted to the client's last ValDone of the round,
and round starts and aggregations are global instants. Times are microseconds since the run's first event.

Perfetto treats pid 0 and tid 0 as the kernel's idle task, so ``pid`` is the device's position in the
configured list plus one and ``tid`` is the slot index plus one; the names ("cuda:0", "slot 0") say which.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, NoReturn

from fedevents.engine.bus import ALL, EventBus, Subscription
from fedevents.engine.errors import OutputError
from fedevents.engine.eventfile import first_line, stream_header
from fedevents.engine.events import (
    Aggregated,
    ClientFailed,
    Event,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentInterrupted,
    ExperimentStarted,
    RoundFinished,
    RoundStarted,
    TrainDone,
    TrainStarted,
    ValDone,
    ValStarted,
    strict_json,
    to_dict,
)

from .atomic import close_quietly, output_failed
from .jsonarray import AppendArray
from .eventtext import event_line, event_metrics_text, plain_text
from .logsink import SINK_PRIORITY
from .streams import LineStream, trim_partial_tail

__all__ = ["TraceRecorder"]

_ENDS = (ExperimentFinished, ExperimentFailed, ExperimentInterrupted)
_encode = strict_json  # strict JSON: a NaN metric is written as "NaN", never as a bare token


class TraceRecorder:
    """Writes ``events_path`` (JSON lines) and ``chrome_path`` (Chrome trace event format).

    Either path may be None to leave that file out; ``summary()`` counts the same either way.
    ``compress_events`` writes the events as a gzip stream (name the path ``….jsonl.gz``). The events stream
    begins with one header line holding the run id, experiment name and schema version, which its event
    lines then leave out (``fedevents.engine.eventfile``; ``read_events`` reads it back).
    """

    def __init__(self, events_path: Path | None, chrome_path: Path | None, *,
                 compress_events: bool = False) -> None:
        self.events_path = None if events_path is None else Path(events_path)
        self.chrome_path = None if chrome_path is None else Path(chrome_path)
        self.compress_events = compress_events
        self._opened = False
        self._file: LineStream | None = None
        self._run_id = self._exp_name = ""  # what the events stream's header holds
        self._t0: float | None = None
        self._last_mono = 0.0
        self._chrome: AppendArray | None = None
        self._offset_us = 0.0
        self._pids: dict[str, int] = {}
        self._threads: set[tuple[int, int]] = set()
        self._open_train: dict[tuple[int, str], TrainStarted] = {}
        # Per (round, client): the validation's start, its span (written at the round's end) and the time of
        # its last ValDone so far, whose duration is worked out once, when the span is written.
        self._open_val: dict[tuple[int, str], list[Any]] = {}
        self._trainings: Counter[tuple[str, int]] = Counter()
        self._busy: defaultdict[tuple[str, int], float] = defaultdict(float)
        self._closed = False
        self._subs: list[Subscription] = []
        # What each kind of event adds besides its line (the bus has matched the type already: every event
        # reaches this sink for the events stream).
        self._then: dict[type[Event], Callable[[Any], None]] = {
            TrainStarted: self._train_started, TrainDone: self._train_done, ValStarted: self._val_started,
            ValDone: self._val_done, RoundStarted: self._round_started, Aggregated: self._aggregated,
            ClientFailed: self._client_failed, RoundFinished: self._round_over,
            **{end: self._round_over for end in _ENDS},
        }

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
        if self.events_path is not None:  # the trace mends itself on resume
            trim_partial_tail(self.events_path, compress=self.compress_events)
        raise output_failed(getattr(exc, "filename", None) or self.events_path, exc)

    def _handle(self, event: Event) -> None:
        if not self._opened:
            if not isinstance(event, ExperimentStarted) or self._closed:
                return
            self._open(event)
        if self._file is not None:
            self._file.write(self._line(event))
        self._last_mono = event.mono_time
        then = self._then.get(type(event))
        if then is not None:
            then(event)

    def summary(self) -> dict[str, Any]:
        """Trainings and busy seconds per (device, slot), their totals, and the makespan seen so far."""
        return {
            "trainings": dict(self._trainings),
            "busy_s": dict(self._busy),
            "total_trainings": sum(self._trainings.values()),
            "makespan_s": 0.0 if self._t0 is None else self._last_mono - self._t0,
        }

    def close(self) -> None:
        """Flush and close both files; safe to call more than once."""
        for sub in self._subs:
            sub.unsubscribe()
        self._closed = True
        if not self._opened:
            return
        try:
            self._close_validations()
            for stream in (self._file, self._chrome):
                if stream is not None:
                    stream.close()
        except OSError as exc:
            self._failed_write(exc)
        finally:
            self._file = self._chrome = None
            self._opened = False

    def _flush(self) -> None:
        for stream in (self._file, self._chrome):
            if stream is not None:
                stream.flush()

    def _line(self, event: Event) -> str:
        if event.run_id == self._run_id and event.exp_name == self._exp_name:
            return event_line(event) + "\n"
        return _encode(to_dict(event)) + "\n"  # an event of another run keeps its own run fields

    def _open(self, ev: ExperimentStarted) -> None:
        self._opened = True
        # A resumed run continues the events and the trace of the run it resumes.
        if self.events_path is not None:
            self.events_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = LineStream(self.events_path, keep=ev.resumed, compress=self.compress_events)
            self._start_stream(self._file, self.events_path, ev)
        self._t0 = ev.mono_time
        if self.chrome_path is not None:
            self.chrome_path.parent.mkdir(parents=True, exist_ok=True)
            self._chrome = self._open_chrome(ev.resumed)
        for device in ev.devices:
            self._pid(device)

    def _start_stream(self, stream: LineStream, path: Path, ev: ExperimentStarted) -> None:
        """Write the header, unless the stream this run continues begins with this very header.

        A resumed stream (already cut back to its last whole line) that is empty, its header cut by a
        kill, gets the header now. One written before streams had headers, or under another schema version
        or experiment name, gets it as its next line, which then applies to the lines after it. A stream of
        another run is refused, not mixed in.
        """
        self._run_id, self._exp_name = ev.run_id, ev.exp_name
        try:
            start = first_line(path) if ev.resumed else None
        except ValueError as exc:  # its first line is not JSON
            self._refuse(str(exc))
        except (OSError, EOFError) as exc:  # a damaged gzip stream
            self._refuse(f"{path}: expected a fedevents events stream, found {str(exc) or type(exc).__name__}")
        if start is not None and start.get("run_id", ev.run_id) != ev.run_id:
            self._refuse(f"{path}: expected the events of run {ev.run_id}, found those of run {start['run_id']}")
        header = stream_header(ev.run_id, ev.exp_name)
        if start != header:
            stream.write(_encode(header) + "\n")
            stream.flush()  # whole before any event: a stream with events always has its header

    def _refuse(self, message: str) -> NoReturn:
        """Stop the run rather than write this run's events into a stream they do not belong to."""
        close_quietly(self._file)
        self._file, self._closed = None, True
        raise OutputError(f"{message}; move it away and run the same command with --resume")

    def _open_chrome(self, resumed: bool) -> AppendArray:
        """The trace as a JSON array that parses after every write; spans are appended as they end.

        A resumed run continues the trace it finds (never rewriting what is there; a tail cut short by a
        kill is cut back to its last whole span), its clock shifted to start one second after those spans.
        """
        chrome = AppendArray(self.chrome_path, keep=resumed)  # type: ignore[arg-type]
        if chrome.earlier:
            ends = [e.get("ts", 0) + e.get("dur", 0) for e in chrome.earlier if isinstance(e, dict)]
            self._offset_us = max(ends, default=0.0) + 1e6  # a one-second gap marks the restart
        chrome.earlier = []  # read once for the offset; a long run keeps none of its trace in memory
        return chrome

    def _put(self, event: dict[str, Any]) -> None:
        if self._chrome is not None:
            self._chrome.add(event)

    def _close_validations(self) -> None:
        for start, span, end in self._open_val.values():
            if end is not None:  # the span grows to the client's last ValDone of the round
                span["dur"] = round(max(end - start, 0.0) * 1e6, 3)
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

    def _train_started(self, ev: TrainStarted) -> None:
        self._open_train[(ev.round, ev.client)] = ev

    def _train_done(self, ev: TrainDone) -> None:
        started = self._open_train.pop((ev.round, ev.client), None)
        start = started.mono_time if started is not None else ev.mono_time - ev.ran_s
        if self._chrome is not None:
            self._train_span(ev, start)
        self._trainings[(ev.device, ev.slot)] += 1
        self._busy[(ev.device, ev.slot)] += ev.mono_time - start

    def _train_span(self, ev: TrainDone, start: float) -> None:
        """The training's span, written as text from the fields (and the metrics text of the event's line);
        a span with a value that is not plain is built as a dict and encoded, as every span once was."""
        name = f"train {ev.client} r{ev.round}"
        args = None
        metrics = event_metrics_text(ev)
        if metrics is not None:
            task, waited, samples = plain_text(ev.task), plain_text(ev.waited_s), plain_text(ev.samples)
            if task is not None and waited is not None and samples is not None:
                args = f'{{"task":{task},"waited_s":{waited},"samples":{samples},"metrics":{metrics}}}'
        text = None if args is None else self._span_text(name, "train", start, ev.mono_time, ev.device, ev.slot,
                                                          args)
        if text is None:
            self._span(name, "train", start, ev.mono_time, ev.device, ev.slot,
                       {"task": ev.task, "waited_s": ev.waited_s, "samples": ev.samples, "metrics": dict(ev.metrics)})
        else:
            self._chrome.add_text(text)  # type: ignore[union-attr]

    def _span_text(self, name: str, cat: str, start: float, end: float, device: str, slot: int,
                   args: str) -> str | None:
        """``strict_json`` of ``_span``'s dict, with ``args`` already JSON; None where a number is not plain."""
        if type(slot) is not int:
            return None
        pid, tid = self._where(device, slot)
        ts, dur = plain_text(self._us(start)), plain_text(round(max(end - start, 0.0) * 1e6, 3))
        if ts is None or dur is None:
            return None
        return (f'{{"ph":"X","name":{plain_text(name)},"cat":"{cat}","ts":{ts},"dur":{dur},"pid":{pid},'
                f'"tid":{tid},"args":{args}}}')

    def _val_started(self, ev: ValStarted) -> None:
        if self._chrome is None:
            return
        span = self._span(f"val {ev.client} r{ev.round}", "val", ev.mono_time, ev.mono_time, ev.device, ev.slot,
                          {"waited_s": ev.waited_s, "metrics": {}}, write=False)
        self._open_val[(ev.round, ev.client)] = [ev.mono_time, span, None]

    def _val_done(self, ev: ValDone) -> None:
        if self._chrome is None:
            return
        opened = self._open_val.get((ev.round, ev.client))
        if opened is None:
            start = ev.mono_time - ev.ran_s
            span = self._span(f"val {ev.client} r{ev.round}", "val", start, ev.mono_time, ev.device, ev.slot,
                              {"metrics": {}}, write=False)
            opened = self._open_val[(ev.round, ev.client)] = [start, span, None]
        opened[2] = ev.mono_time
        opened[1]["args"]["metrics"][ev.task] = dict(ev.metrics)

    def _round_started(self, ev: RoundStarted) -> None:
        self._instant(f"round {ev.round} started", ev, {})

    def _aggregated(self, ev: Aggregated) -> None:
        self._instant(f"aggregated r{ev.round}", ev, {"clients": len(ev.clients), "samples": ev.samples,
                                                      "ran_s": ev.ran_s})

    def _round_over(self, ev: Event) -> None:
        self._close_validations()  # a round's validations are over when it finishes
        self._flush()  # at the end too, so a tracker that attaches the files finds them whole

    def _instant(self, name: str, ev: Event, args: dict[str, Any]) -> None:
        if self._chrome is None:
            return
        self._put({"ph": "i", "s": "g", "name": name, "ts": self._us(ev.mono_time),
                   "pid": 1, "tid": 1, "args": {"round": ev.round, **args}})  # type: ignore[attr-defined]

    def _client_failed(self, ev: ClientFailed) -> None:
        started = self._open_train.pop((ev.round, ev.client), None)
        if self._chrome is None:
            return
        if started is not None and ev.phase == "train":
            self._span(f"train {ev.client} r{ev.round} (failed)", "train", started.mono_time, ev.mono_time,
                       started.device, started.slot, {"task": ev.task, "error": f"{ev.error_type}: {ev.error}"})
        opened = self._open_val.get((ev.round, ev.client))
        if opened is not None and ev.phase == "validate":
            opened[1]["args"]["error"] = f"{ev.error_type}: {ev.error}"
