"""The JSON recorder: the FedSTIL experiment record, ``data.<client>.<round>.<task>.<metric>``.

Training and validation metrics of one (client, round, task) are merged into one dict, so neither erases
the other. Clients that keep their scores in a round (ValReused) get the scores they keep under that round;
the rounds a client keeps one scoring share one dict of it in memory, so a record of 100,000 clients that
keep theirs holds one small dict per client scoring, not one per client and round. The record is kept in memory and written whole, atomically (temporary file, fsync, rename),
only when a round finishes and when the run ends, never on every event.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

from fedevents.engine.bus import EventBus, Subscription
from fedevents.engine.events import (
    ClientFailed,
    ClientUploaded,
    Event,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentInterrupted,
    ExperimentStarted,
    RoundFinished,
    TrainDone,
    GlobalValDone,
    ValDone,
    ValReused,
    json_safe,
    strict_json,
)

from .atomic import output_failed, write_text_atomic
from .logsink import SINK_PRIORITY

__all__ = ["JsonRecorder", "format_record", "write_json_atomic", "write_text_atomic"]

_EVENTS = (ExperimentStarted, TrainDone, ValDone, ValReused, GlobalValDone, ClientUploaded, ClientFailed, RoundFinished, ExperimentFinished,
           ExperimentFailed,
           ExperimentInterrupted)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``write_text_atomic`` of ``obj`` as compact JSON (the C encoder; ``indent`` would need the slow one)."""
    write_text_atomic(path, strict_json(obj))


def format_record(record: Mapping[str, Any], *, lines: "ClientLines | None" = None) -> str:
    """The record as JSON a person can read and diff: one line per client under ``data``.

    Indenting everything would double the size and run the pure-Python encoder over every metric. ``lines``
    keeps the text of the rounds already written (a recorder writes the same record again each round).
    """
    lines = lines or ClientLines()
    parts = []
    for key, value in record.items():
        if key == "data":
            clients = ",\n".join([lines.line(c, r) for c, r in value.items()])
            body = "{\n" + clients + "\n  }" if clients else "{}"
        else:
            body = strict_json(value, indent=2).replace("\n", "\n  ")
        parts.append(f"  {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


_encode = json.JSONEncoder(separators=(", ", ": "), allow_nan=False, default=str).encode


def _text(value: Any) -> str:
    """``strict_json(value, separators=(', ', ': '))``, with an encoder made once instead of per call."""
    try:
        return _encode(value)
    except ValueError:  # a NaN or an infinity somewhere
        return _encode(json_safe(value))


class ClientLines:
    """Each client's line under the record's ``data``, the text of its earlier rounds kept between writes.

    A client's rounds only ever grow at the end, and every round but its last is final (a round's training
    and validation metrics arrive before the next round's), so only the last round is encoded again on each
    write. ``forget(client)`` drops what is kept, for a client whose rounds were reordered.
    """

    def __init__(self) -> None:
        self._kept: dict[str, tuple[int, str]] = {}  # client -> (rounds kept, '    "name": {<their text>')

    def forget(self, client: str) -> None:
        self._kept.pop(client, None)

    def line(self, client: str, rounds: Mapping[str, Any]) -> str:
        if not rounds:
            return f"    {json.dumps(client)}: {{}}"
        kept, text = self._kept.get(client, (0, ""))
        last = len(rounds) - 1
        if kept > last:  # fewer rounds than before: start over
            kept, text = 0, ""
        if not text:
            text = f"    {json.dumps(client)}: {{"
        if kept < last:
            items = list(rounds.items())
            new = ", ".join([f"{json.dumps(r)}: {_text(v)}" for r, v in items[kept:last]])
            text = text + new if kept == 0 else f"{text}, {new}"
            self._kept[client] = (kept, text) = (last, text)
            r, v = items[last]
        else:
            r = next(reversed(rounds))
            v = rounds[r]
        return f"{text}{', ' if kept else ''}{json.dumps(r)}: {_text(v)}}}"


class JsonRecorder:
    """Keeps the experiment record of one run and writes it to ``path``.

    ``status`` is ``running`` until ExperimentFinished (``finished``), ExperimentFailed (``failed``, with
    ``error``) or ExperimentInterrupted (``interrupted``); a run closed without either is recorded as failed. A resumed run (ExperimentStarted with
    ``resumed``) keeps the rounds before ``first_round`` from the checkpoint's copy of the record
    (``load_state_dict``), or, without one, from an existing record at ``path``.
    """

    def __init__(self, path: Path, config: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.config = config
        self.record: dict[str, Any] | None = None
        self._data: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        self._failures: list[dict[str, Any]] = []
        self._comm: dict[str, list[int]] = {}  # round -> [uploads, bytes]
        self._global: dict[str, dict[str, dict[str, float]]] = {}  # round -> task -> metrics of the global model
        self._dirty = False
        self._subs: list[Subscription] = []
        self._restored: dict[str, Any] | None = None
        # client -> (the scores a ValReused named, the record's dict of them shared by the rounds that keep them)
        self._kept: dict[str, tuple[Mapping[str, Any], dict[str, dict[str, float]]]] = {}
        self._lines = ClientLines()
        self._unordered: set[str] = set()  # clients whose rounds did not arrive in order (a resume's)

    def subscribe(self, bus: EventBus, *, priority: int = SINK_PRIORITY) -> list[Subscription]:
        self._subs.append(bus.subscribe(_EVENTS, self.handle, priority=priority))
        return self._subs[-1:]

    def handle(self, event: Event) -> None:
        kind = type(event)
        if kind is TrainDone or kind is ValDone:
            if self.record is not None:
                self._merge(event.client, event.round, event.task, event.metrics)  # type: ignore[attr-defined]
        elif kind is ValReused:
            if self.record is not None:
                self._reused(event)  # type: ignore[arg-type]
        elif kind is GlobalValDone:
            if self.record is not None:
                tasks = self._global.setdefault(str(event.round), {})  # type: ignore[attr-defined]
                tasks.setdefault(event.task, {}).update(event.metrics)  # type: ignore[attr-defined]
                self._dirty = True
        elif kind is ClientUploaded:
            if self.record is not None:
                counts = self._comm.setdefault(str(event.round), [0, 0])  # type: ignore[attr-defined]
                counts[0] += 1
                counts[1] += event.nbytes  # type: ignore[attr-defined]
        elif kind is RoundFinished:
            if self.record is not None:
                self.record["last_round"] = event.round  # type: ignore[attr-defined]
                self.write()
        elif kind is ExperimentStarted:
            if self.record is None:
                self._start(event)  # type: ignore[arg-type]
        elif kind is ClientFailed:
            self._failed_client(event)  # type: ignore[arg-type]
        elif kind is ExperimentFinished:
            if event.stopped:  # type: ignore[attr-defined]
                self._end("stopped", None, stopped=event.stopped, rounds=event.rounds)  # type: ignore[attr-defined]
            else:
                self._end("finished", None)
        elif kind is ExperimentFailed:
            self._end("failed", event.reason)  # type: ignore[attr-defined]
        elif kind is ExperimentInterrupted:
            self._end("interrupted", f"stopped by {event.signal}; resume from round {event.last_checkpoint}")  # type: ignore[attr-defined]

    def metrics(self, client: str, round: int, task: str) -> dict[str, float]:
        """The merged metrics recorded for one (client, round, task); empty when there are none."""
        return dict(self._data.get(client, {}).get(str(round), {}).get(task, {}))

    def state_dict(self) -> dict[str, Any]:
        """The record of the rounds so far (metrics, upload counts, failures): what a checkpoint carries."""
        return {"data": self._data, "comm": self._comm, "failures": self._failures, "global": self._global}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the earlier rounds of a resumed run from ``state_dict()`` of its checkpoint, not from the file."""
        self._restored = copy.deepcopy(dict(state))

    def write(self) -> None:
        """Write the record now (atomically); does nothing before ExperimentStarted."""
        if self.record is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, format_record(self._snapshot(), lines=self._lines))
        except OSError as exc:  # the previous record stays whole; the run stops before its checkpoint
            raise output_failed(self.path, exc) from None
        self._dirty = False

    def close(self) -> None:
        """Write the final record; a run that neither finished nor failed is recorded as failed."""
        for sub in self._subs:
            sub.unsubscribe()
        if self.record is None:
            return
        if self.record["status"] == "running":
            self.record["status"] = "failed"
            self.record["error"] = "the run stopped before it finished"
            self._dirty = True
        if self._dirty:
            self.write()

    def _start(self, ev: ExperimentStarted) -> None:
        self.record = {"config": json_safe(self.config), "run_id": ev.run_id, "status": "running"}
        if ev.dry_run:  # no scores in it: the report leaves such a record out
            self.record["dry_run"] = True
        if ev.resumed and self._restored is not None:
            self._data, self._comm, self._failures, self._global = _restored_rounds(self._restored, ev.first_round)
        elif ev.resumed:
            self._data, self._comm, self._global = _earlier_rounds(self.path, ev.first_round)
        self._unordered.update(self._data)  # whatever order the earlier rounds came in, they are sorted once
        self.write()

    def _merge(self, client: str, rnd: int, task: str, metrics: Mapping[str, float]) -> None:
        rounds = self._data.get(client)
        if rounds is None:
            rounds = self._data[client] = {}
        key = str(rnd)
        tasks = rounds.get(key)
        if tasks is None:
            if rounds and int(next(reversed(rounds))) > rnd:
                self._unordered.add(client)
            tasks = rounds[key] = {}
        elif client in self._kept and tasks is self._kept[client][1]:  # shared by rounds: copy, then write
            tasks = rounds[key] = {name: dict(metrics) for name, metrics in tasks.items()}
        slot = tasks.get(task)
        if slot is None:
            tasks[task] = dict(metrics)
        else:
            slot.update(metrics)
        self._dirty = True

    def _reused(self, ev: ValReused) -> None:
        key = str(ev.round)
        data, kept = self._data, self._kept
        for client, scores in zip(ev.clients, ev.scores):
            known = kept.get(client)
            if known is None or known[0] is not scores:
                known = kept[client] = (scores, {task: dict(metrics) for task, metrics in scores.items()})
            rounds = data.get(client)
            if rounds is None:
                rounds = data[client] = {}
            tasks = rounds.get(key)
            if tasks is None and rounds and int(next(reversed(rounds))) > ev.round:
                self._unordered.add(client)
            # A client that keeps its scores did not train in the round, so the round is new to it; merge
            # into fresh dicts all the same, never into the shared one.
            rounds[key] = known[1] if tasks is None else {
                **tasks, **{task: {**tasks.get(task, {}), **metrics} for task, metrics in known[1].items()}}
        self._dirty = True

    def _failed_client(self, ev: ClientFailed) -> None:
        if self.record is None:
            return
        self._failures.append(
            {"round": ev.round, "client": ev.client, "task": ev.task, "phase": ev.phase,
             "error": f"{ev.error_type}: {ev.error}"}
        )
        self._dirty = True

    def _end(self, status: str, error: str | None, **extra: Any) -> None:
        if self.record is None:
            return
        self.record["status"] = status
        if error is not None:
            self.record["error"] = error
        self.record.update(extra)
        self.write()

    def _snapshot(self) -> dict[str, Any]:
        out = dict(self.record or {})
        # Rounds arrive in order except, rarely, after a resume; numeric order keeps "10" after "9".
        for client in self._unordered:
            rounds = self._data[client]
            self._data[client] = dict(sorted(rounds.items(), key=lambda kv: int(kv[0])))
            self._lines.forget(client)
        self._unordered.clear()
        out["data"] = self._data
        if self._comm:
            by_round = dict(sorted(self._comm.items(), key=lambda kv: int(kv[0])))
            out["comm"] = {"uploads": sum(v[0] for v in by_round.values()),
                           "upload_bytes": sum(v[1] for v in by_round.values()), "by_round": by_round}
        if self._global:
            out["global"] = dict(sorted(self._global.items(), key=lambda kv: int(kv[0])))
        if self._failures:
            out["failures"] = list(self._failures)
        return out


def _earlier_rounds(path: Path, first_round: int) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]],
                                                          dict[str, Any]]:
    """The metrics, upload counts and global-model scores of the rounds a resumed run does not repeat."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        data, by_round = record.get("data", {}), record.get("comm", {}).get("by_round", {})
        scores = record.get("global", {})
    except (OSError, ValueError, AttributeError):
        return {}, {}, {}
    kept: dict[str, dict[str, Any]] = {}
    for client, rounds in data.items():
        earlier = {r: tasks for r, tasks in rounds.items() if r.isdigit() and int(r) < first_round}
        if earlier:
            kept[client] = earlier
    comm = {r: list(v) for r, v in by_round.items() if r.isdigit() and int(r) < first_round}
    earlier = {r: tasks for r, tasks in scores.items() if r.isdigit() and int(r) < first_round}
    return kept, comm, earlier


def _restored_rounds(state: Mapping[str, Any], first_round: int) -> tuple[dict[str, Any], dict[str, list[int]],
                                                                          list[dict[str, Any]], dict[str, Any]]:
    """The metrics, upload counts, failures and global-model scores of a checkpoint's record before
    ``first_round``."""
    data = {}
    for client, rounds in state.get("data", {}).items():
        earlier = {r: tasks for r, tasks in rounds.items() if int(r) < first_round}
        if earlier:
            data[client] = earlier
    comm = {r: list(v) for r, v in state.get("comm", {}).items() if int(r) < first_round}
    failures = [dict(f) for f in state.get("failures", []) if f["round"] < first_round]
    scores = {r: tasks for r, tasks in state.get("global", {}).items() if int(r) < first_round}
    return data, comm, failures, scores
