"""read_events: the events stream's header merged into each event, plain or gzip, older streams too."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fedevents.engine import read_events
from fedevents.engine.eventfile import first_line, is_header, stream_header

HEADER = {"stream": "fedevents.events", "schema": 1, "run_id": "demo-1", "exp_name": "demo"}
STARTED = {"event": "RoundStarted", "seq": 2, "wall_time": 1.5, "mono_time": 0.5, "round": 0}
FULL = {"event": "RoundStarted", "schema": 1, "run_id": "demo-1", "exp_name": "demo", "seq": 2, "wall_time": 1.5,
        "mono_time": 0.5, "round": 0}


def write(path: Path, *lines: dict | str, end: str = "\n") -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + end
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def test_the_header_is_the_run_fields_once() -> None:
    assert stream_header("demo-1", "demo") == HEADER
    assert is_header(HEADER) and not is_header(STARTED)
    assert not is_header({"event": "Custom", "stream": "fedevents.events"})  # an event with a stream field


@pytest.mark.parametrize("name", ["run.events.jsonl", "run.events.jsonl.gz"])
def test_each_event_gets_the_header_fields_in_to_dicts_key_order(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, HEADER, STARTED, {**STARTED, "seq": 3, "round": 1})
    read = list(read_events(path))
    assert [list(e.items()) for e in read] == [list(FULL.items()), list({**FULL, "seq": 3, "round": 1}.items())]


def test_gzip_is_recognised_by_its_content_not_its_name(tmp_path: Path) -> None:
    path = tmp_path / "renamed.jsonl"
    path.write_bytes(gzip.compress((json.dumps(HEADER) + "\n" + json.dumps(STARTED) + "\n").encode()))
    assert list(read_events(path)) == [FULL]


def test_a_stream_from_before_headers_reads_as_it_was_written(tmp_path: Path) -> None:
    path = write(tmp_path / "old.events.jsonl", FULL, {**FULL, "seq": 3})
    assert list(read_events(path)) == [FULL, {**FULL, "seq": 3}]


def test_a_line_with_its_own_run_fields_keeps_them(tmp_path: Path) -> None:
    other = {**FULL, "run_id": "other-2"}
    assert list(read_events(write(tmp_path / "e.jsonl", HEADER, other))) == [other]


def test_a_header_applies_to_the_lines_after_it_so_joined_streams_read_whole(tmp_path: Path) -> None:
    second = {**HEADER, "run_id": "demo-2"}
    path = write(tmp_path / "joined.jsonl", HEADER, STARTED, second, STARTED)
    assert [e["run_id"] for e in read_events(path)] == ["demo-1", "demo-2"]


def test_a_tail_cut_by_a_kill_is_left_out(tmp_path: Path) -> None:
    plain = write(tmp_path / "cut.jsonl", HEADER, STARTED, '{"event":"RoundSta', end="")
    assert list(read_events(plain)) == [FULL]
    whole = gzip.compress((json.dumps(HEADER) + "\n" + json.dumps(STARTED) + "\n").encode())
    member = gzip.compress(b'{"event":"RoundStarted","seq":3,"wall_time":2.5,"mono_time":1.5,"round":1}\n')
    cut = member[:len(member) // 2]  # the last write was cut in half
    (tmp_path / "cut.jsonl.gz").write_bytes(whole + cut)
    assert list(read_events(tmp_path / "cut.jsonl.gz")) == [FULL]


@pytest.mark.parametrize("line", ["not json", "[1, 2]"])
def test_a_line_that_is_not_an_object_is_named(tmp_path: Path, line: str) -> None:
    path = write(tmp_path / "bad.jsonl", HEADER, STARTED, line, STARTED)
    with pytest.raises(ValueError) as info:
        list(read_events(path))
    assert str(info.value) == f"{path}:3: expected a JSON object, found {line + chr(10)!r}"


def test_an_object_that_is_neither_event_nor_header_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", HEADER, {"seq": 1})
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected an event or the stream's header, found"):
        list(read_events(path))


def test_first_line_of_an_empty_stream_is_none(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert first_line(tmp_path / "empty.jsonl") is None
    assert first_line(write(tmp_path / "e.jsonl.gz", HEADER, STARTED)) == HEADER
