"""AppendArray: a JSON array file that parses after every write and survives a write cut short."""

from __future__ import annotations

import json
from pathlib import Path

from fedevents.handlers.jsonarray import AppendArray, repair_array


def test_a_new_array_parses_before_and_after_each_flush(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    array = AppendArray(path)
    assert json.loads(path.read_text()) == []
    array.add({"i": 1})
    assert json.loads(path.read_text()) == []  # buffered until flushed
    array.flush()
    assert json.loads(path.read_text()) == [{"i": 1}]
    array.add({"i": 2})
    array.add({"i": 3})
    array.close()
    assert path.read_text() == '[\n{"i":1},\n{"i":2},\n{"i":3}\n]\n'


def test_continuing_keeps_the_items_and_appends_after_them(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    first = AppendArray(path)
    first.add({"i": 1})
    first.close()
    second = AppendArray(path, keep=True)
    assert second.earlier == [{"i": 1}]
    second.add({"i": 2})
    second.close()
    assert json.loads(path.read_text()) == [{"i": 1}, {"i": 2}]


def test_a_write_cut_short_is_cut_back_to_the_last_whole_item(tmp_path: Path) -> None:
    """A kill inside the one write of a flush leaves the new items half there and no closing bracket."""
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n{"i":1},\n{"i":2},\n{"i":3,"na')
    array = AppendArray(path, keep=True)
    assert json.loads(path.read_text()) == [{"i": 1}, {"i": 2}]
    array.add({"i": 4})
    array.close()
    assert json.loads(path.read_text()) == [{"i": 1}, {"i": 2}, {"i": 4}]


def test_an_open_array_of_an_older_run_is_closed_without_losing_an_item(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n{"i":1},\n{"i":2}')
    assert repair_array(path) == (len(b'[\n{"i":1},\n{"i":2}'), [{"i": 1}, {"i": 2}])
    assert json.loads(path.read_text()) == [{"i": 1}, {"i": 2}]


def test_an_unreadable_file_becomes_an_empty_array(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(b"")
    array = AppendArray(path, keep=True)
    array.add({"i": 1})
    array.close()
    assert json.loads(path.read_text()) == [{"i": 1}]
