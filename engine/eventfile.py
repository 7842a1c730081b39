"""The events stream's file format and its reader: a header line with what every event of the run shares,
then one line per event with the rest.

::

    {"stream":"fedevents.events","schema":1,"run_id":"demo-20261202-101500-1a2b3c","exp_name":"demo"}
    {"event":"ExperimentStarted","seq":0,"wall_time":1764670500.1,"mono_time":12.5,"method":"fedavg",…}
    {"event":"RoundStarted","seq":1,"wall_time":1764670500.2,"mono_time":12.6,"round":0}

The schema version, run id and experiment name (``RUN_FIELDS``) are the same for every event of a run, so
the header holds them once. An event line holds ``to_dict(event)`` without them; a line that carries one
of them itself keeps its own value, so a stream written before the header existed (every field on every
line) reads the same. A header line applies to the lines after it, wherever it stands: streams joined
with ``cat`` read as they were written. ``read_events`` gives back exactly the dicts ``to_dict`` made,
from plain or gzip streams (recognised by their content, not their name).
"""

from __future__ import annotations

import gzip
import json
from os import PathLike
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

from .events import SCHEMA_VERSION

__all__ = ["STREAM_NAME", "RUN_FIELDS", "stream_header", "is_header", "first_line", "read_events"]

#: The header's ``stream`` value: what the file is, for a reader that finds it without its name.
STREAM_NAME = "fedevents.events"
#: The fields of ``to_dict`` that every event of a run shares: written once, in the header.
RUN_FIELDS = ("schema", "run_id", "exp_name")

_GZIP_MAGIC = b"\x1f\x8b"


def stream_header(run_id: str, exp_name: str) -> dict[str, Any]:
    """The first line of the events stream of run ``run_id``, as a dict."""
    return {"stream": STREAM_NAME, "schema": SCHEMA_VERSION, "run_id": run_id, "exp_name": exp_name}


def is_header(line: Mapping[str, Any]) -> bool:
    """Whether a parsed line is a stream header (every event line has an ``event`` key; a header has none)."""
    return "event" not in line and line.get("stream") == STREAM_NAME


def first_line(path: str | PathLike[str]) -> dict[str, Any] | None:
    """The first line of a stream, parsed; None for an empty file. A ValueError says what else was found."""
    with _open(Path(path)) as f:
        text = f.readline()
    if not text:
        return None
    return _parse(text, path, 1)


def read_events(path: str | PathLike[str]) -> Iterator[dict[str, Any]]:
    """The events of a stream (``<run>.events.jsonl`` or ``.jsonl.gz``) as the dicts ``to_dict`` made.

    A tail cut short by a kill (an unterminated last line, the undecodable end of a gzip stream) is left
    out; any other line that is not an event or a header is a ValueError naming it.
    """
    path = Path(path)
    run: dict[str, Any] = {}
    with _open(path) as f:
        for number, text in enumerate(_whole_lines(f), 1):
            line = _parse(text, path, number)
            if is_header(line):
                run = {name: line[name] for name in RUN_FIELDS if name in line}
            elif "event" in line:
                yield {"event": line["event"], **run, **line}  # to_dict's key order: event, schema, run_id, …
            else:
                raise ValueError(f"{path}:{number}: expected an event or the stream's header, found {text[:80]!r}")


def _open(path: Path) -> IO[str]:
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _whole_lines(f: IO[str]) -> Iterator[str]:
    """The lines of ``f`` that end in a newline; a cut tail ends the iteration."""
    try:
        for text in f:
            if not text.endswith("\n"):
                return
            yield text
    except EOFError:  # a gzip member cut short; the lines it gave whole before that were read
        return


def _parse(text: str, path: str | PathLike[str], number: int) -> dict[str, Any]:
    try:
        line = json.loads(text)
    except ValueError:
        line = None
    if not isinstance(line, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, found {text[:80]!r}")
    return line
