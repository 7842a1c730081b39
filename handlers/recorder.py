"""The JSON recorder: the FedSTIL experiment record, ``data.<client>.<round>.<task>.<metric>``.

Training and validation metrics of one (client, round, task) are merged into one dict, so neither erases
the other. Clients that keep their scores in a round (ValReused) get the scores they keep under that round.
The record is kept in memory, its finished rounds as text (``RecordData``), and written whole, atomically
(temporary file, fsync, rename), only when a round finishes and when the run ends, never on every event.
"""

from __future__ import annotations

import copy
import json
import math
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
    strict_encoder,
    strict_json,
)

from .atomic import output_failed, write_text_atomic
from .logsink import SINK_PRIORITY

__all__ = ["JsonRecorder", "RecordData", "format_record", "write_json_atomic", "write_text_atomic"]

_EVENTS = (ExperimentStarted, TrainDone, ValDone, ValReused, GlobalValDone, ClientUploaded, ClientFailed, RoundFinished, ExperimentFinished,
           ExperimentFailed,
           ExperimentInterrupted)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``write_text_atomic`` of ``obj`` as compact JSON (the C encoder; ``indent`` would need the slow one)."""
    write_text_atomic(path, strict_json(obj))


def format_record(record: Mapping[str, Any]) -> str:
    """The record as JSON a person can read and diff: one line per client under ``data``.

    Indenting everything would double the size and run the pure-Python encoder over every metric.
    """
    return _compose(record, lambda data: [f"    {json.dumps(c)}: {_text(r)}" for c, r in data.items()])


def _compose(record: Mapping[str, Any], data_lines: Any) -> str:
    """``format_record``'s layout, with the lines under ``data`` made by ``data_lines(record["data"])``."""
    parts = []
    for key, value in record.items():
        if key == "data":
            clients = ",\n".join(data_lines(value))
            body = "{\n" + clients + "\n  }" if clients else "{}"
        else:
            body = strict_json(value, indent=2).replace("\n", "\n  ")
        parts.append(f"  {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


_encode = strict_encoder((", ", ": "))


def _text(value: Any) -> str:
    """``strict_json(value, separators=(', ', ': '))``, with an encoder made once instead of per call."""
    try:
        return _encode(value)
    except ValueError:  # a NaN or an infinity somewhere
        return _encode(json_safe(value))


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics read back from the record's text, with ``"NaN"`` and the infinities numbers again."""
    return {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in metrics.items()}


class RecordData:
    """The record's ``data``: per client, its finished rounds as the text the record holds, and its open
    rounds (those whose events may still arrive) as dicts.

    A run of 100,000 clients over 10 rounds holds a million (client, round) entries; as dicts of dicts they
    would take several hundred MiB, as text a few dozen. A round is sealed (encoded, and its dicts dropped)
    when it finishes; its metrics never change after that, so every round is encoded once, however often
    the record is written. Clients keep the order in which they first appeared.
    """

    def __init__(self) -> None:
        # client -> [its name as a JSON string, its finished rounds' text, its open rounds: key -> task -> metrics]
        self._clients: dict[str, list[Any]] = {}
        self._open: set[str] = set()  # clients with open rounds
        self._sealed = -1  # every round up to this one is sealed
        self._keys: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def merge(self, client: str, rnd: int, task: str, metrics: Mapping[str, float]) -> None:
        """Merge ``metrics`` into those of (``client``, ``rnd``, ``task``)."""
        entry = self._clients.get(client)
        if entry is None:
            entry = self._clients[client] = [json.dumps(client), "", {}]
        elif rnd <= self._sealed and entry[1]:  # never seen in a run: a round reopened after it finished
            entry[2] = {**self._parsed(entry), **entry[2]}
            entry[1] = ""
        key = self._keys.get(rnd) or self._keys.setdefault(rnd, str(rnd))
        tasks = entry[2].get(key)
        if tasks is None:
            tasks = entry[2][key] = {}
        slot = tasks.get(task)
        if slot is None:
            tasks[task] = dict(metrics)
        else:
            slot.update(metrics)
        self._open.add(client)

    def seal(self, upto: int) -> None:
        """Encode every open round up to ``upto`` (they are finished) and drop their dicts."""
        for client in self._open:
            entry = self._clients[client]
            rounds = entry[2]
            done = sorted((k for k in rounds if int(k) <= upto), key=int)
            if done:
                text = ", ".join([f"{json.dumps(k)}: {_text(rounds.pop(k))}" for k in done])
                entry[1] = f"{entry[1]}, {text}" if entry[1] else text
        self._open = {c for c in self._open if self._clients[c][2]}
        self._sealed = max(self._sealed, upto)

    def lines(self) -> list[str]:
        """Each client's line under ``data``, as ``format_record`` writes it."""
        out = []
        for name, text, rounds in self._clients.values():
            if rounds:
                more = ", ".join([f"{json.dumps(k)}: {_text(v)}" for k, v in sorted(rounds.items(), key=lambda kv: int(kv[0]))])
                text = f"{text}, {more}" if text else more
            out.append(f"    {name}: {{{text}}}")
        return out

    def rounds(self, client: str) -> dict[str, Any]:
        """``client``'s rounds as dicts (round key -> task -> metrics), in round order."""
        entry = self._clients.get(client)
        if entry is None:
            return {}
        merged = {**self._parsed(entry), **entry[2]}
        return dict(sorted(merged.items(), key=lambda kv: int(kv[0])))

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Every client's rounds as dicts: a fresh copy, what a checkpoint carries."""
        return {client: self.rounds(client) for client in self._clients}

    @staticmethod
    def _parsed(entry: list[Any]) -> dict[str, Any]:
        if not entry[1]:
            return {}
        rounds = json.loads("{" + entry[1] + "}")
        return {r: {t: _numbers(m) for t, m in tasks.items()} for r, tasks in rounds.items()}

    @classmethod
    def of(cls, data: Mapping[str, Mapping[str, Any]], first_round: int) -> "RecordData":
        """The data of a resumed run's earlier rounds (all before ``first_round``), sealed."""
        out = cls()
        for client, rounds in data.items():
            for key, tasks in rounds.items():
                for task, metrics in tasks.items():
                    out.merge(client, int(key), task, metrics)
        out.seal(first_round - 1)
        return out


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
        self._data = RecordData()
        self._failures: list[dict[str, Any]] = []
        self._comm: dict[str, list[int]] = {}  # round -> [uploads, bytes]
        self._global: dict[str, dict[str, dict[str, float]]] = {}  # round -> task -> metrics of the global model
        self._dirty = False
        self._subs: list[Subscription] = []
        self._restored: dict[str, Any] | None = None

    def subscribe(self, bus: EventBus, *, priority: int = SINK_PRIORITY) -> list[Subscription]:
        self._subs.append(bus.subscribe(_EVENTS, self.handle, priority=priority))
        return self._subs[-1:]

    def handle(self, event: Event) -> None:
        kind = type(event)
        if kind is TrainDone or kind is ValDone:
            if self.record is not None:
                self._data.merge(event.client, event.round, event.task, event.metrics)  # type: ignore[attr-defined]
                self._dirty = True
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
                self._data.seal(event.round)  # type: ignore[attr-defined]
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
            self._end("interrupted", _interrupted(event.signal, event.last_checkpoint))  # type: ignore[attr-defined]

    def metrics(self, client: str, round: int, task: str) -> dict[str, float]:
        """The merged metrics recorded for one (client, round, task); empty when there are none."""
        return dict(self._data.rounds(client).get(str(round), {}).get(task, {}))

    def state_dict(self) -> dict[str, Any]:
        """The record of the rounds so far (metrics, upload counts, failures): what a checkpoint carries."""
        return {"data": self._data.as_dict(), "comm": self._comm, "failures": self._failures, "global": self._global}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the earlier rounds of a resumed run from ``state_dict()`` of its checkpoint, not from the file."""
        self._restored = copy.deepcopy(dict(state))

    def write(self) -> None:
        """Write the record now (atomically); does nothing before ExperimentStarted."""
        if self.record is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, _compose(self._snapshot(), lambda data: data.lines()))
        except OSError as exc:  # the previous record stays whole; the run stops before its checkpoint
            raise output_failed(self.path, exc) from None
        self._dirty = False

    def abandon(self, signal_name: str, last_checkpoint: int) -> None:
        """Mark a running record interrupted and write it: called from another thread when a signalled run
        cannot stop on its own (a sync handler holds the event loop, so nothing else touches the record)."""
        if self.record is not None and self.record["status"] == "running":
            self._end("interrupted", _interrupted(signal_name, last_checkpoint))

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
            data, self._comm, self._failures, self._global = _restored_rounds(self._restored, ev.first_round)
            self._data = RecordData.of(data, ev.first_round)
        elif ev.resumed:
            data, self._comm, self._global = _earlier_rounds(self.path, ev.first_round)
            self._data = RecordData.of(data, ev.first_round)
        self.write()

    def _reused(self, ev: ValReused) -> None:
        merge = self._data.merge
        for client, scores in zip(ev.clients, ev.scores):
            for task, metrics in scores.items():
                merge(client, ev.round, task, metrics)
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
        out["data"] = self._data  # written by RecordData.lines
        if self._comm:
            by_round = dict(sorted(self._comm.items(), key=lambda kv: int(kv[0])))
            out["comm"] = {"uploads": sum(v[0] for v in by_round.values()),
                           "upload_bytes": sum(v[1] for v in by_round.values()), "by_round": by_round}
        if self._global:
            out["global"] = dict(sorted(self._global.items(), key=lambda kv: int(kv[0])))
        if self._failures:
            out["failures"] = list(self._failures)
        return out


def _interrupted(signal_name: str, last_checkpoint: int) -> str:
    """The record's ``error`` of an interrupted run: what stopped it and where ``--resume`` continues."""
    return f"stopped by {signal_name}; resume from round {last_checkpoint}"


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
