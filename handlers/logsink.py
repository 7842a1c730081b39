"""The structlog sink: every log line as JSON lines in a file, a readable console.

``configure_logging`` sets structlog up for one run. Its processor chain merges the context variables
(``round``, ``client``, … bound by the engine; they follow ``anyio.to_thread.run_sync`` into training
threads), adds the level, an ISO timestamp and the run's static fields, writes the line to the JSONL file,
and then lets through to the console only the lines meant for a person: those marked ``_console=True``
(round summaries, experiment start/finish/failure, failed clients) and warnings or worse. Everything else
is dropped with ``structlog.DropEvent`` after the file write.

``LogSink`` subscribes to the bus, configures structlog on ExperimentStarted (so a run refused before it
starts leaves no file) and puts the previous configuration back on ``close()``. The events themselves are
written once, by the trace recorder's events stream; the log holds what was logged, by the engine, the
handlers and the training threads, and the run's summary lines.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Mapping, TextIO

import structlog

from fedevents.engine.bus import ALL, EventBus, Subscription
from fedevents.engine.events import (
    ClientFailed,
    Event,
    CheckpointSaved,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentInterrupted,
    ExperimentStarted,
    GlobalValDone,
    RoundFinished,
    TrainDone,
    ValDone,
    ValReused,
    strict_json,
)

from .streams import LineStream, trim_partial_tail
from .atomic import close_quietly, output_failed

__all__ = ["LEVELS", "LogSink", "LoggingSetup", "SINK_PRIORITY", "configure_logging"]

#: Sinks run before work handlers (priority 0), so they see every event as soon as it is emitted, in
#: sequence order, rather than after the work it triggers.
SINK_PRIORITY = 1_000

LEVELS = ("debug", "info", "warning", "error", "critical")
_LEVEL_NO = {name: 10 * (i + 1) for i, name in enumerate(LEVELS)}
_LEVEL_NO.update(warn=30, exception=40, fatal=50, failure=40, msg=20, log=20)
_CONSOLE_KEYS = ("timestamp", "level", "event")
# One encoder for every line: json.dumps with options builds a new encoder on each call.
_encode = strict_json  # strict JSON: a NaN metric is written as "NaN", never as a bare token


def check_level(level: str) -> str:
    """``level`` in lower case, or a ValueError naming the accepted levels."""
    if not isinstance(level, str):
        raise TypeError(f"level must be a str, found {type(level).__name__}")
    if level.lower() not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, found {level!r}")
    return level.lower()


class _JsonlWriter:
    """Processor: appends the event dict as one JSON line; thread-safe, since training threads log too."""

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.error: OSError | None = None

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if self._stream is not None:
            record = event_dict
            if "_console" in record:
                record = {k: v for k, v in record.items() if k != "_console"}
            line = _encode(record)
            urgent = _LEVEL_NO.get(method, 20) >= 30
            with self._lock:
                if self._stream is not None:
                    try:
                        self._stream.write(line + "\n")
                        if urgent:  # a warning should survive a crash that follows it
                            self._stream.flush()
                    except OSError as exc:  # kept for the sink to raise: any thread may be logging here
                        self._broke(exc)
        return event_dict

    def flush(self) -> None:
        with self._lock:
            if self._stream is not None:
                try:
                    self._stream.flush()
                except OSError as exc:
                    self._broke(exc)

    def _broke(self, exc: OSError) -> None:
        self.error, self._stream = exc, None  # stop writing: a failed file gets nothing more

    def detach(self) -> None:
        """Stop writing; the caller closes the stream."""
        with self._lock:
            self._stream = None


class _ConsoleFilter:
    """Processor: keeps lines meant for a person, trimmed to what a person reads; drops the rest."""

    def __init__(self, level: str, enabled: bool) -> None:
        self._min = _LEVEL_NO[level]
        self._enabled = enabled

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if not self._enabled:
            raise structlog.DropEvent
        level_no = _LEVEL_NO.get(method, 20)
        if event_dict.pop("_console", False):
            if level_no < self._min:
                raise structlog.DropEvent
            # The message already says it all; the structured fields are for the file.
            return {k: event_dict[k] for k in _CONSOLE_KEYS if k in event_dict}
        if level_no < max(self._min, 30):
            raise structlog.DropEvent
        return event_dict


class _IsoTimestamp:
    """Processor: an ISO 8601 UTC ``timestamp`` with microseconds; the seconds part is formatted once a second."""

    def __init__(self) -> None:
        self._cached: tuple[int, str] = (-1, "")  # swapped whole, so threads never mix two seconds

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        second = int(now)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, prefix)
        event_dict["timestamp"] = f"{prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


def _static(fields: Mapping[str, Any]):
    items = tuple(fields.items())

    def add_static(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        for key, value in items:
            event_dict.setdefault(key, value)
        return event_dict

    return add_static


def _add_logger_name(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    name = getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


def _render_plain(logger: Any, method: str, event_dict: dict[str, Any]) -> str:
    head = f"{event_dict.pop('timestamp', '')} [{event_dict.pop('level', method)}] {event_dict.pop('event', '')}"
    rest = " ".join(f"{k}={v}" for k, v in event_dict.items())
    return f"{head}  {rest}" if rest else head


class _ConsoleLogger:
    """The wrapped logger: prints rendered lines to ``console`` and remembers its name for the file."""

    def __init__(self, console: TextIO | None, lock: threading.Lock, name: str | None) -> None:
        self.name = name
        self._console = console
        self._lock = lock

    def msg(self, message: str) -> None:
        if self._console is None:
            return
        with self._lock:
            self._console.write(message + "\n")
            self._console.flush()

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class _ConsoleLoggerFactory:
    def __init__(self, console: TextIO | None) -> None:
        self._console = console
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> _ConsoleLogger:
        return _ConsoleLogger(self._console, self._lock, str(args[0]) if args else None)


@dataclass(eq=False)
class LoggingSetup:
    """What ``configure_logging`` changed: ``restore()`` puts structlog back as it found it."""

    previous: dict[str, Any]
    was_configured: bool
    _writer: _JsonlWriter = field(repr=False)

    def flush(self) -> None:
        """Flush the JSONL file (under the writers' lock)."""
        self._writer.flush()

    @property
    def error(self) -> OSError | None:
        """The error that stopped writes to the JSONL file, if one did."""
        return self._writer.error

    def restore(self) -> None:
        """Flush, stop writing to the file and restore the previous configuration; safe to repeat."""
        self._writer.flush()
        self._writer.detach()
        if self.was_configured:
            structlog.configure(**self.previous)
        else:
            structlog.reset_defaults()


def configure_logging(
    jsonl: IO[str] | None = None,
    *,
    console: TextIO | None = sys.stderr,
    pretty: bool | None = None,
    level: str = "info",
    bind: Mapping[str, Any] | None = None,
) -> LoggingSetup:
    """Configure structlog for one run; ``.restore()`` on the result undoes it.

    Lines at ``info`` and up (``debug`` too when ``level`` is debug) go to ``jsonl``, with ``bind`` added
    to each; the console gets lines meant for a person at ``level`` and up, and warnings and errors.
    ``pretty`` (default: whether ``console`` is a terminal) picks structlog's ConsoleRenderer over plain
    ``key=value`` text.
    """
    level = check_level(level)
    if pretty is None:
        pretty = bool(console is not None and getattr(console, "isatty", lambda: False)())
    previous = structlog.get_config()
    previous["processors"] = list(previous["processors"])
    setup = LoggingSetup(previous, structlog.is_configured(), _JsonlWriter(jsonl))
    renderer = structlog.dev.ConsoleRenderer(colors=True) if pretty else _render_plain
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _IsoTimestamp(),
            _static(bind or {}),
            _add_logger_name,
            structlog.processors.format_exc_info,
            setup._writer,
            _ConsoleFilter(level, console is not None),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(min(_LEVEL_NO[level], _LEVEL_NO["info"])),
        context_class=dict,
        logger_factory=_ConsoleLoggerFactory(console),
        # Caching would pin module-level loggers to this run's configuration after it is restored.
        cache_logger_on_first_use=False,
    )
    return setup


class _RoundStats:
    """Metric sums of one round, kept per metric name in order of first appearance."""

    __slots__ = ("train", "val", "glob")

    def __init__(self) -> None:
        self.train: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.val: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.glob: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    @staticmethod
    def add(into: dict[str, list[float]], metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                acc = into[name]
                acc[0] += value
                acc[1] += 1

    @staticmethod
    def means(of: dict[str, list[float]]) -> dict[str, float]:
        return {name: total / n for name, (total, n) in of.items() if n}


class LogSink:
    """Writes the run's log lines to ``jsonl_path`` and a human summary of the run to ``console``.

    ``level`` is the least level shown on the console (the file keeps ``info`` and up regardless);
    ``pretty`` defaults to whether ``console`` is a terminal; ``record_path``, when given, is named in the
    console line at the end of a finished run; ``compress`` writes the file as a gzip stream.
    """

    def __init__(
        self,
        jsonl_path: Path | None,
        *,
        console: TextIO | None = sys.stderr,
        pretty: bool | None = None,
        level: str = "info",
        record_path: Path | None = None,
        compress: bool = False,
    ) -> None:
        self.jsonl_path = None if jsonl_path is None else Path(jsonl_path)
        self.compress = compress
        self.console = console
        self.pretty = pretty
        self.level = check_level(level)
        self.record_path = Path(record_path) if record_path is not None else None
        self._file: LineStream | None = None
        self._logging: LoggingSetup | None = None
        self._person: Any = None
        self._rounds = 0
        self._subs: list[Subscription] = []
        self._closed = False
        self._stats: dict[int, _RoundStats] = defaultdict(_RoundStats)

    def subscribe(self, bus: EventBus, *, priority: int = SINK_PRIORITY) -> list[Subscription]:
        self._subs.append(bus.subscribe(ALL, self.handle, priority=priority))
        return self._subs[-1:]

    def handle(self, event: Event) -> None:
        try:
            self._handle(event)
        except OSError as exc:
            self._failed_write(exc)
        if self._logging is not None and self._logging.error is not None:
            self._failed_write(self._logging.error)

    def _failed_write(self, exc: OSError) -> None:
        """Give the file up without a half line at its end, and stop the run with one line."""
        if self._logging is not None:
            self._logging.restore()
            self._logging = None
        close_quietly(self._file)
        self._file = self._person = None
        self._closed = True
        if self.jsonl_path is not None:
            trim_partial_tail(self.jsonl_path, compress=self.compress)
        raise output_failed(self.jsonl_path, exc)

    def _handle(self, event: Event) -> None:
        if self._person is None and isinstance(event, ExperimentStarted) and not self._closed:
            self._open(event)
        if self._person is None:
            return
        kind = type(event)
        if kind is TrainDone:
            _RoundStats.add(self._stats[event.round].train, event.metrics)
        elif kind is ValDone:
            _RoundStats.add(self._stats[event.round].val, event.metrics)
        elif kind is ValReused:  # kept scores count in the round's means as fresh ones would
            into = self._stats[event.round].val
            for scores in event.scores:
                for metrics in scores.values():
                    _RoundStats.add(into, metrics)
        elif kind is GlobalValDone:
            _RoundStats.add(self._stats[event.round].glob, event.metrics)
        elif kind is RoundFinished:
            self._round_finished(event)
        elif kind is ClientFailed:
            self._client_failed(event)
        elif kind is ExperimentStarted:
            self._started(event)
        elif kind is ExperimentFinished:
            self._finished(event)
        elif kind is ExperimentFailed:
            self._failed(event)
        elif kind is ExperimentInterrupted:
            self._person.warning(
                f"experiment {event.exp_name} interrupted by {event.signal} in round {event.round}; "
                f"run the same command with --resume to continue from round {event.last_checkpoint + 1}",
                _console=True, round=event.round)
            self._logging.flush()  # type: ignore[union-attr]
        elif kind is CheckpointSaved:
            self._person.info(f"checkpoint after round {event.round}: {event.path}", round=event.round,
                              nbytes=event.nbytes, seconds=event.seconds)

    def close(self) -> None:
        """Flush and close the file and put structlog's previous configuration back; safe to repeat."""
        self._closed = True
        for sub in self._subs:
            sub.unsubscribe()
        if self._logging is not None:
            self._logging.restore()
            failed, self._logging = self._logging.error, None
            if failed is not None:
                self._failed_write(failed)
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._file = None
                self._failed_write(exc)
            self._file = None
        self._person = None

    def _open(self, event: ExperimentStarted) -> None:
        if self.jsonl_path is not None:  # None: the console alone
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            # A resumed run continues the log of the run it resumes.
            self._file = LineStream(self.jsonl_path, keep=event.resumed, compress=self.compress)
        self._logging = configure_logging(
            self._file,  # type: ignore[arg-type]  # a LineStream writes and flushes as a text file does
            console=self.console, pretty=self.pretty, level=self.level, bind={"run_id": event.run_id},
        )
        self._person = structlog.get_logger("fedevents.run").bind()
        self._rounds = event.rounds

    def _started(self, ev: ExperimentStarted) -> None:
        devices = ",".join(ev.devices)
        mode = ("  dry run" if ev.dry_run else "") + (f"  resumed at round {ev.first_round}" if ev.resumed else "")
        self._person.info(
            f"experiment {ev.exp_name} started  {ev.method}  {ev.clients} clients ({ev.online_clients} online)"
            f"  {ev.rounds} rounds  devices {devices} × {ev.parallel} parallel{mode}  run {ev.run_id}",
            _console=True,
        )

    def _round_finished(self, ev: RoundFinished) -> None:
        stats = self._stats.pop(ev.round, None) or _RoundStats()
        train, val = _RoundStats.means(stats.train), _RoundStats.means(stats.val)
        parts = [f"round {ev.round}/{self._rounds}"]
        if ev.round == 0 or (ev.trained == 0 and ev.failed == 0):
            parts.append(f"clients {ev.validated} validated")
        else:
            parts.append(f"clients {ev.trained} trained" + (f", {ev.failed} failed" if ev.failed else ""))
        if train:
            parts.append(_format_metrics(train))
        shown = {k: v for k, v in val.items() if not k.endswith("_loss")} or val
        if shown:
            parts.append(("local " if stats.glob else "") + _format_metrics(shown))
        glob = _RoundStats.means(stats.glob)
        shown = {k: v for k, v in glob.items() if not k.endswith("_loss")} or glob
        if shown:
            parts.append("global " + _format_metrics(shown))
        parts.append(f"{ev.seconds:.2f}s")
        self._person.info(
            "  ".join(parts),
            _console=True,
            round=ev.round,
            trained=ev.trained,
            failed=ev.failed,
            validated=ev.validated,
            seconds=ev.seconds,
            train=train,
            val=val,
            **({"global": glob} if glob else {}),
        )
        self._logging.flush()  # type: ignore[union-attr]

    def _client_failed(self, ev: ClientFailed) -> None:
        verb = {"train": "training", "validate": "validating", "aggregate": "aggregating"}.get(ev.phase, ev.phase)
        self._person.error(
            f"client {ev.client} failed in round {ev.round} while {verb} {ev.task}: {ev.error_type}: {ev.error}",
            _console=True,
            round=ev.round,
            client=ev.client,
            task=ev.task,
            traceback=ev.traceback,
        )

    def _finished(self, ev: ExperimentFinished) -> None:
        where = self.record_path if self.record_path is not None else self.jsonl_path
        ended = f"stopped after {ev.rounds} rounds ({ev.stopped})" if ev.stopped else f"finished  {ev.rounds} rounds"
        self._person.info(
            f"experiment {ev.exp_name} {ended} in {ev.seconds:.2f}s  record {where}",
            _console=True,
            seconds=ev.seconds,
        )

    def _failed(self, ev: ExperimentFailed) -> None:
        self._person.error(
            f"experiment {ev.exp_name} failed in round {ev.round}: {ev.reason}",
            _console=True,
            round=ev.round,
            traceback=ev.traceback,
        )


def _format_metrics(means: Mapping[str, float]) -> str:
    return " ".join(f"{name} {value:.3f}" for name, value in means.items())
