"""The experiment report: one row of summaries per run record, as a terminal table, Markdown, CSV and plots.

A row holds the final score, the continual-learning summaries of ``fedevents.federated.continual`` and the
communication volume of one run, each a mean over the run's clients. The records are the JSON files the
recorder writes (``data.<client>.<round>.<task>.<metric>``); reading them needs no torch work. A value the
record cannot give is None here and "n/a" in every output, never a made-up number.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedevents.engine.config import ClientSet
from fedevents.engine.errors import ConfigError
from fedevents.engine.runner import task_index
from fedevents.federated import continual

from fedevents.handlers.atomic import write_text_atomic

__all__ = [
    "ClientSeries",
    "ExperimentReport",
    "Report",
    "build_report",
    "find_records",
    "format_csv",
    "format_markdown",
    "format_table",
    "load_record",
    "make_out_dir",
    "write_report",
]

#: The primary metric when none is asked for: rank-1 for ReID records, else classification accuracy.
PRIMARY_METRICS = ("val_rank_1", "val_acc")
MAP_METRIC = "val_map"
#: The continual-learning summaries of each client, averaged over the clients into a report row.
_SUMMARIES = ("average_accuracy", "forgetting_fedstil", "forgetting_max_final", "backward_transfer")

Scores = Mapping[int, Mapping[str, float]]

@dataclass(frozen=True)
class ClientSeries:
    """One client's part of a record: its task stream, its training rounds and its validation scores."""

    name: str
    tasks: tuple[str, ...]
    trained: tuple[int, ...]  # rounds with training metrics: one upload each
    participations: tuple[int, ...]  # rounds it was sent to train, a failed training included
    scores: Scores  # the primary metric, {round: {task: score}}, every validated task
    maps: Scores  # val_map the same way; empty for a classification record

@dataclass(frozen=True)
class ExperimentReport:
    """The summaries of one run; every score is a mean over the clients that have it."""

    label: str  # exp_name, made unique among the report's runs; names the plot files
    exp_name: str
    method: str | None
    status: str | None
    run_id: str | None
    last_round: int | None
    metric: str | None
    final: float | None
    final_map: float | None
    average_accuracy: float | None
    forgetting_fedstil: float | None
    forgetting_max_final: float | None
    backward_transfer: float | None
    uploads: int
    upload_bytes: int | None
    tasks_shared: bool  # every client has the same task stream
    seed: int | None  # random_seed
    group: str  # the config without random_seed (and where files go): runs of one group differ only in seed
    clients: tuple[ClientSeries, ...]
    #: The global (aggregated) model's primary metric, {round: {task: score}} (exp_opts.val_model global/both).
    global_scores: Scores = field(default_factory=dict)
    global_final: float | None = None  # its last round's scores, averaged over tasks

@dataclass(frozen=True)
class Report:
    """The rows of a report, one per record, in the order the records were given."""

    experiments: tuple[ExperimentReport, ...]

def load_record(path: str | Path) -> dict[str, Any]:
    """Read one fedevents JSON record; anything else is a ConfigError naming the file and what it holds."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise _not_a_record(path, "no such file") from None
    except IsADirectoryError:
        raise _not_a_record(path, "a directory") from None
    except UnicodeDecodeError:
        raise _not_a_record(path, "bytes that are not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _not_a_record(path, f"invalid JSON ({exc})") from None
    except OSError as exc:
        raise _not_a_record(path, f"an unreadable file ({exc.strerror})") from None
    _check_record(record, str(path))
    return record

TRACE_SUFFIX = ".trace.json"


def find_records(paths: Sequence[str | Path]) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """The records among ``paths`` (files, or folders searched for ``*.json``), each with its path, and notes.

    Perfetto traces (``*.trace.json``, or any JSON array of trace events) and dry-run records (no scores) are
    left out with a note saying so; any other file that is not a record is a ConfigError. A folder holding
    no record is one too.
    """
    found: list[tuple[Path, dict[str, Any]]] = []
    notes: list[str] = []
    for given in map(Path, paths):
        if given.is_dir():
            candidates = sorted(p for p in given.rglob("*.json") if p.is_file() and not p.name.endswith(TRACE_SUFFIX))
            kept = [_keep(path, found, notes) for path in candidates]  # every one, for its note
            if not any(kept):
                raise ConfigError(f"report: {given}: expected a folder holding fedevents JSON records, found none")
        elif given.name.endswith(TRACE_SUFFIX):
            notes.append(f"report: left out {given}: a Perfetto trace, not a record")
        else:
            _keep(given, found, notes)
    if not found:
        raise ConfigError(f"report: expected at least one record to report on, found only {len(notes)} left out")
    return found, notes


def _keep(path: Path, found: list[tuple[Path, dict[str, Any]]], notes: list[str]) -> bool:
    """Add the record at ``path`` to ``found``, or a note on why it is left out; say whether it was added."""
    try:
        record = load_record(path)
    except ConfigError:
        if _is_trace(path):
            notes.append(f"report: left out {path}: a Perfetto trace, not a record")
            return False
        raise
    if record.get("dry_run") is True:
        notes.append(f"report: left out {path}: a dry-run record (no scores)")
        return False
    found.append((path, record))
    return True


def _is_trace(path: Path) -> bool:
    """Whether ``path`` starts as a Chrome/Perfetto trace: a JSON array of events with a ``ph`` (phase) key."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError:
        return False
    return head.startswith(b"[") and b'"ph"' in head


def build_report(records: Sequence[Mapping[str, Any]], *, metric: str | None = None) -> Report:
    """Summarise each record on ``metric`` (default: ``val_rank_1`` where recorded, else ``val_acc``)."""
    for i, record in enumerate(records):
        _check_record(record, f"records[{i}]")
    if metric is not None:
        _check_metric(records, metric)
    rows = [_experiment(record, metric) for record in records]
    labels = _unique_labels(rows)
    return Report(tuple(_relabel(row, label) for row, label in zip(rows, labels)))

# --- reading one record ------------------------------------------------------------------------------------

def _experiment(record: Mapping[str, Any], metric: str | None) -> dict[str, Any]:
    config = record["config"]
    scored = record.get("global") if isinstance(record.get("global"), Mapping) else {}
    metric = metric or _primary_metric(record["data"]) or _primary_metric({"server": scored})
    global_scores = _global_scores(scored, metric)
    clients = _clients(config, record["data"], record.get("failures"), metric)
    sustain = _positive_int(_get(config, "task_opts", "sustain_rounds")) or 1
    last = max((max(c.scores) for c in clients if c.scores), default=None)
    per_client = [_client_summary(client, sustain, last) for client in clients]
    return {
        "label": "",
        "exp_name": _text(config.get("exp_name")) or _text(record.get("run_id")) or "experiment",
        "method": _text(config.get("exp_method")),
        "status": _text(record.get("status")),
        "run_id": _text(record.get("run_id")),
        "last_round": _whole(record.get("last_round")),
        "metric": metric,
        "final": _mean_of(_final(c.scores) for c in clients),
        "final_map": _mean_of(_final(c.maps) for c in clients),
        **{key: _mean_of(s[key] for s in per_client) for key in _SUMMARIES},
        "uploads": sum(len(c.trained) for c in clients),
        "upload_bytes": _whole(_get(record, "comm", "upload_bytes")),
        "tasks_shared": len({c.tasks for c in clients}) <= 1,
        "seed": _whole(config.get("random_seed")),
        "group": _group(config),
        "clients": tuple(clients),
        "global_scores": global_scores,
        "global_final": _final(global_scores),
    }


def _global_scores(scored: Mapping[str, Any], metric: str | None) -> dict[int, dict[str, float]]:
    """``metric`` of the global model by round and task, from the record's ``global`` section."""
    out: dict[int, dict[str, float]] = {}
    for rnd, tasks in scored.items():
        if _is_round(rnd) and isinstance(tasks, Mapping):
            row = {t: m[metric] for t, m in tasks.items() if isinstance(m, Mapping) and _is_number(m.get(metric))}
            if row:
                out[int(rnd)] = row
    return dict(sorted(out.items()))

#: Keys that say where a run's files go or which seed it drew, not what experiment it is.
_NOT_THE_EXPERIMENT = ("random_seed", "exp_name", "group", "logs_dir", "checkpoints_dir", "datasets_dir", "handlers",
                       "outputs")


def _group(config: Mapping[str, Any]) -> str:
    kept = {k: v for k, v in config.items() if k not in _NOT_THE_EXPERIMENT}
    return json.dumps(kept, sort_keys=True, default=str)


def _primary_metric(data: Mapping[str, Any]) -> str | None:
    recorded = _recorded_metrics(data)
    return next((m for m in PRIMARY_METRICS if m in recorded), None)

def _recorded_metrics(data: Mapping[str, Any]) -> set[str]:
    return {m for rounds in data.values() for tasks in rounds.values() for row in tasks.values() for m in row}

def _check_metric(records: Sequence[Mapping[str, Any]], metric: str) -> None:
    recorded = set().union(*(_recorded_metrics(r["data"]) for r in records))
    if metric not in recorded:
        raise ConfigError(f"report: metric {metric!r}: expected one of the recorded metrics {sorted(recorded)}, "
                          f"found it in no record")

def _clients(config: Mapping[str, Any], data: Mapping[str, Any], failures: Any, metric: str | None
             ) -> list[ClientSeries]:
    streams = _configured_streams(config)
    names = list(streams) + [name for name in data if name not in streams]
    failed = _failed_trainings(failures)
    return [_client(name, streams.get(name), data.get(name, {}), failed.get(name, ()), metric) for name in names]

def _configured_streams(config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Each configured client's task list, in config order; empty when the config has no usable clients."""
    try:
        clients = ClientSet.from_config(config["clients"])
        return {name: tuple(str(t) for t in clients.tasks(name)) for name in clients.names}
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}

def _failed_trainings(failures: Any) -> dict[str, list[int]]:
    # The engine counts a dispatch as a participation before training, so a failed training moves the stream on.
    failed: dict[str, list[int]] = {}
    for entry in failures if isinstance(failures, list) else ():
        if isinstance(entry, Mapping) and entry.get("phase") == "train" and _whole(entry.get("round")) is not None:
            failed.setdefault(str(entry.get("client")), []).append(int(entry["round"]))
    return failed

def _client(name: str, tasks: tuple[str, ...] | None, rounds: Mapping[str, Any], failed: Sequence[int],
            metric: str | None) -> ClientSeries:
    by_round = {int(r): row for r, row in rounds.items() if _is_round(r)}
    trained = tuple(r for r in sorted(by_round) if any(_is_train(m) for t in by_round[r].values() for m in t))
    # Without a usable config, the tasks in the order the record first names them (the engine validates in
    # stream order); with one, a score for a task outside the configured stream has no place in it.
    stream = tasks if tasks is not None else tuple(dict.fromkeys(t for r in sorted(by_round) for t in by_round[r]))
    return ClientSeries(
        name=name,
        tasks=stream,
        trained=trained,
        participations=tuple(sorted(set(trained) | set(failed))),
        scores=_metric_scores(by_round, stream, metric),
        maps=_metric_scores(by_round, stream, MAP_METRIC),
    )

def _metric_scores(by_round: Mapping[int, Mapping[str, Mapping[str, Any]]], tasks: Sequence[str],
                   metric: str | None) -> Scores:
    scores: dict[int, dict[str, float]] = {}
    for rnd in sorted(by_round):
        row = {t: float(m[metric]) for t, m in by_round[rnd].items() if t in tasks and _is_number(m.get(metric))}
        if row:
            scores[rnd] = row
    return scores

# --- summaries of one client ------------------------------------------------------------------------------

def _final(scores: Scores) -> float | None:
    """A client's score in its last validated round, averaged over the tasks scored then."""
    return _mean(list(scores[max(scores)].values())) if scores else None

def _task_spans(participations: Sequence[int], tasks: Sequence[str], sustain_rounds: int) -> dict[str, tuple[int, int]]:
    """The first and last round each task was trained in, following the engine's task stream."""
    spans: dict[str, tuple[int, int]] = {}
    for i, rnd in enumerate(participations):
        task = tasks[task_index(i, sustain_rounds, len(tasks))]
        spans[task] = (spans.get(task, (rnd, rnd))[0], rnd)
    return spans

def _client_summary(client: ClientSeries, sustain: int, last: int | None) -> dict[str, float | None]:
    """The continual summaries of one client; ``last`` is the run's last validated round.

    Average accuracy and FedSTIL forgetting follow FedSTIL's analysis scripts at round ``last``: every task
    of the client's stream counts, trained yet or not. The other two are about tasks already learnt: a
    task's scores count from the round its training started (validation follows training in a round).
    A client with one task has no forgetting and no BWT.
    """
    spans = _task_spans(client.participations, client.tasks, sustain) if client.tasks else {}
    started = [t for t in client.tasks if t in spans]  # in stream order, so the last is the current task
    seen: dict[int, dict[str, float]] = {}
    for rnd, row in client.scores.items():
        kept = {t: v for t, v in row.items() if t in spans and spans[t][0] <= rnd}
        if kept:
            seen[rnd] = kept
    # A task's end is scored at the first validation from its last training round on: validation runs
    # every val_interval rounds, so the end round itself may have none.
    ends = {t: _first_scored(seen, t, spans[t][1]) for t in started[:-1]}
    several = len(client.tasks) > 1
    return {
        "average_accuracy": continual.accuracy_on_round(client.scores, last) if last is not None else None,
        "forgetting_fedstil": (_safe(continual.forgetting_fedstil, client.scores, client.tasks, last)
                               if several and last is not None else None),
        "forgetting_max_final": _safe(continual.forgetting_max_final, seen, started) if several else None,
        "backward_transfer": (_safe(continual.backward_transfer, seen, started, ends)
                              if several and None not in ends.values() else None),
    }

def _first_scored(scores: Scores, task: str, since: int) -> int | None:
    return next((r for r in sorted(scores) if r >= since and task in scores[r]), None)

def _safe(summary: Callable[..., float | None], *args: Any) -> float | None:
    # The summaries raise ValueError on scores that do not fit the task stream: that client has no value.
    try:
        return summary(*args)
    except ValueError:
        return None

# --- output ------------------------------------------------------------------------------------------------

#: (terminal and Markdown header, CSV header, ExperimentReport field)
_COLUMNS = (
    ("experiment", "experiment", "label"),
    ("method", "method", "method"),
    ("status", "status", "status"),
    ("rounds", "rounds", "last_round"),
    ("metric", "metric", "metric"),
    ("final", "final", "final"),
    ("global final", "global_final", "global_final"),
    ("mAP", "final_map", "final_map"),
    ("avg acc", "average_accuracy", "average_accuracy"),
    ("forget FedSTIL", "forgetting_fedstil", "forgetting_fedstil"),
    ("forget max-final", "forgetting_max_final", "forgetting_max_final"),
    ("BWT", "bwt", "backward_transfer"),
    ("uploads", "uploads", "uploads"),
    ("upload bytes", "upload_bytes", "upload_bytes"),
)

_COLUMN_NOTES = (
    ("final", "the primary metric in each client's last validated round, averaged over its tasks"),
    ("global final", "the global (aggregated) model's primary metric after the last validation round, averaged "
                     "over tasks (exp_opts.val_model global or both); final is each client's own model"),
    ("mAP", "the same for val_map (ReID records)"),
    ("avg acc", "average accuracy at the last validated round over every task of each client's stream "
                "(FedSTIL's accuracy_on_round)"),
    ("forget FedSTIL", "mean fall below each task's peak over the later rounds, pooled over a client's tasks "
                       "(FedSTIL's forgetting_on_round); n/a with one task"),
    ("forget max-final", "best earlier score minus final score, last trained task left out"),
    ("BWT", "backward transfer: final score minus the score when each task's training ended"),
    ("uploads", "client uploads, one per (client, round) with training metrics"),
    ("upload bytes", "bytes uploaded, when the record has a comm section"),
)

def format_table(report: Report) -> str:
    """The report as a fixed-width table for a terminal: text columns left-aligned, numbers right-aligned."""
    header = [h for h, _, _ in _COLUMNS]
    rows = [[_cell(getattr(e, field), grouped=True) for _, _, field in _COLUMNS] for e in report.experiments]
    numeric = [_is_numeric_column(field) for _, _, field in _COLUMNS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])

def format_markdown(report: Report, plots: Sequence[str | Path] = ()) -> str:
    """The report as a Markdown page: the table, what each column means, and the plots by file name."""
    header = [h for h, _, _ in _COLUMNS]
    align = ["---:" if _is_numeric_column(field) else ":---" for _, _, field in _COLUMNS]
    rows = [[_cell(getattr(e, f), grouped=True).replace("|", "\\|") for _, _, f in _COLUMNS]
            for e in report.experiments]
    lines = ["# fedevents report", ""]
    lines += ["| " + " | ".join(cells) + " |" for cells in (header, align, *rows)]
    lines += ["", "Scores are means over clients; n/a marks a value the record cannot give.", ""]
    lines += [f"- **{name}**: {note}" for name, note in _COLUMN_NOTES]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"

def format_csv(report: Report) -> str:
    """The report as CSV, one row per run, numbers at full precision and n/a where there is no value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for _, name, _ in _COLUMNS] + ["run_id"])
    for e in report.experiments:
        writer.writerow([_cell(getattr(e, f), precise=True) for _, _, f in _COLUMNS] + [_cell(e.run_id)])
    return buffer.getvalue()


def write_report(report: Report, out_dir: str | Path, plots: Sequence[str | Path] = ()) -> list[Path]:
    """Write ``report.md`` and ``report.csv`` into ``out_dir`` atomically; give their paths."""
    out = make_out_dir(out_dir)
    written = []
    for name, text in (("report.md", format_markdown(report, plots)), ("report.csv", format_csv(report))):
        written.append(out / name)
        write_text_atomic(out / name, text)
    return written


def make_out_dir(path: str | Path) -> Path:
    """The report folder ``path``, created if missing; a one-line ConfigError if it cannot be."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"report: --out {out}: expected a directory, found a file") from None
    except OSError as exc:
        raise ConfigError(f"report: --out {out}: expected a directory it can write, found {exc.strerror}") from None
    return out

def _cell(value: Any, *, grouped: bool = False, precise: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return repr(value) if precise else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}" if grouped else str(value)
    return str(value)

def _is_numeric_column(field: str) -> bool:
    return field not in ("label", "method", "status", "metric")

# --- checks and small helpers ------------------------------------------------------------------------------

def _not_a_record(where: str | Path, found: str) -> ConfigError:
    return ConfigError(f"report: {where}: expected a fedevents JSON record, found {found}")

def _check_record(record: Any, where: str) -> None:
    """A record is an object with a ``config`` object and ``data`` nested client > round > task > metrics."""
    if not isinstance(record, Mapping):
        raise _not_a_record(where, f"a JSON {_kind(record)}")
    for key in ("config", "data"):
        if key not in record:
            raise _not_a_record(where, f"a JSON object without {key!r} (keys: {', '.join(map(str, record)) or 'none'})")
        if not isinstance(record[key], Mapping):
            raise _not_a_record(where, f"{key} as a JSON {_kind(record[key])}")
    for client, rounds in record["data"].items():
        if not isinstance(rounds, Mapping):
            raise _not_a_record(where, f"data.{client} as a JSON {_kind(rounds)}")
        for rnd, tasks in rounds.items():
            if not isinstance(tasks, Mapping):
                raise _not_a_record(where, f"data.{client}.{rnd} as a JSON {_kind(tasks)}")
            for task, metrics in tasks.items():
                if not isinstance(metrics, Mapping):
                    raise _not_a_record(where, f"data.{client}.{rnd}.{task} as a JSON {_kind(metrics)}")

def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "null" if value is None else type(value).__name__

def _unique_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """exp_name; where two runs share it, exp_name-method; then the run id; then a counter."""
    labels = [row["exp_name"] for row in rows]
    refinements = (lambda row: f"{row['exp_name']}-{row['method']}", lambda row: row["run_id"] or row["exp_name"])
    for refine in refinements:
        counts = Counter(labels)
        labels = [refine(row) if counts[label] > 1 else label for row, label in zip(rows, labels)]
    counts, seen = Counter(labels), Counter[str]()
    numbered = []
    for label in labels:
        seen[label] += 1
        numbered.append(f"{label}-{seen[label]}" if counts[label] > 1 else label)
    return numbered

def _relabel(row: dict[str, Any], label: str) -> ExperimentReport:
    return ExperimentReport(**{**row, "label": label})

def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping

def _is_round(key: Any) -> bool:
    return isinstance(key, str) and key.isdigit()

def _is_train(metric: str) -> bool:
    return metric.startswith("tr_")

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

def _whole(value: Any) -> int | None:
    if _is_number(value) and math.isfinite(value) and value == int(value):
        return int(value)
    return None

def _positive_int(value: Any) -> int | None:
    whole = _whole(value)
    return whole if whole is not None and whole >= 1 else None

def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None

def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None

def _mean_of(values: Any) -> float | None:
    return _mean([v for v in values if v is not None])
