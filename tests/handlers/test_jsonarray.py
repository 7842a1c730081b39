"""AppendArray: a JSON array file that parses after every write and survives a write cut short."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

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


def test_a_kill_while_a_cut_array_is_repaired_keeps_its_whole_items(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the repair emptied the file before writing it again, so a kill in between (a resume
    killed as it reopened the trace) lost every earlier span."""
    import fedevents.handlers.jsonarray as jsonarray

    path = tmp_path / "a.json"
    first = AppendArray(path)
    for i in range(3):
        first.add({"i": i})
    first.close()
    path.write_bytes(path.read_bytes()[:-7])  # the last item cut by a kill

    class Killed(BaseException):
        """Stands for the process dying at the repair's write."""

    real_open = open

    def dies_on_write(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "+" in mode:
            def write(data):
                f.flush()
                raise Killed
            f.write = write
        return f

    monkeypatch.setattr(jsonarray, "open", dies_on_write, raising=False)
    with pytest.raises(Killed):
        repair_array(path)
    monkeypatch.undo()
    assert AppendArray(path, keep=True).earlier == [{"i": 0}, {"i": 1}]


def test_a_symlink_at_the_path_is_replaced_never_read_or_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    for keep in (False, True):
        path = tmp_path / f"keep-{keep}.json"
        path.symlink_to(victim)
        array = AppendArray(path, keep=keep)
        array.add({"i": 1})
        array.close()
        assert not path.is_symlink() and json.loads(path.read_text()) == [{"i": 1}]
    assert victim.read_text() == "the user's own file\n"


def test_a_failed_write_names_the_array_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the trace's full disk was reported as the events file's (a write to a descriptor names
    no file, and the sink took its first)."""
    array = AppendArray(tmp_path / "a.trace.json")
    array.add({"i": 1})

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as failed:
        array.flush()
    assert failed.value.filename == str(tmp_path / "a.trace.json")


def test_an_array_whose_file_was_deleted_fails_its_next_write_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "run.trace.json"
    array = AppendArray(path)
    array.add({"a": 1})
    array.flush()
    path.unlink()
    array.add({"a": 2})
    with pytest.raises(OSError, match="deleted or replaced while the run was writing it") as caught:
        array.flush()
    assert caught.value.errno == errno.ENOENT and caught.value.filename == str(path)
