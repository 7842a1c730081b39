"""LineStream: whole lines, plain or as gzip members, and a tail cut by a kill trimmed when continued."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from fedevents.engine.errors import OutputError
from fedevents.handlers.streams import LineStream, trim_partial_tail


def test_lines_wait_until_flushed_and_are_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    stream = LineStream(path)
    stream.write('{"i":1}\n')
    assert path.read_text() == ""
    stream.flush()
    stream.write('{"i":2}\n')
    stream.close()
    assert path.read_text() == '{"i":1}\n{"i":2}\n'


def test_a_full_buffer_is_written_without_waiting_for_a_flush(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    stream = LineStream(path, buffer_bytes=16)
    stream.write('{"i":1}\n')
    stream.write('{"i":2}\n')  # 16 bytes waiting: written
    assert path.read_text() == '{"i":1}\n{"i":2}\n'
    stream.close()


def test_each_flush_of_a_compressed_stream_is_a_member_zcat_reads(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl.gz"
    stream = LineStream(path, compress=True)
    stream.write('{"i":1}\n')
    stream.flush()
    stream.write('{"i":2}\n')
    stream.close()
    assert gzip.decompress(path.read_bytes()) == b'{"i":1}\n{"i":2}\n'
    assert subprocess.run(["zcat", str(path)], capture_output=True, check=True).stdout == b'{"i":1}\n{"i":2}\n'


def test_continuing_a_plain_stream_drops_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"i":1}\n{"i":2}\n{"i":3,"cut')
    stream = LineStream(path, keep=True)
    stream.write('{"i":4}\n')
    stream.close()
    assert path.read_text() == '{"i":1}\n{"i":2}\n{"i":4}\n'


def test_continuing_a_compressed_stream_drops_a_half_written_member(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl.gz"
    whole = gzip.compress(b'{"i":1}\n') + gzip.compress(b'{"i":2}\n')
    path.write_bytes(whole + gzip.compress(b'{"i":3}\n')[:-5])
    trim_partial_tail(path, compress=True)
    assert path.read_bytes() == whole
    stream = LineStream(path, keep=True, compress=True)
    stream.write('{"i":4}\n')
    stream.close()
    assert gzip.decompress(path.read_bytes()) == b'{"i":1}\n{"i":2}\n{"i":4}\n'


def test_a_new_stream_replaces_an_old_file(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text("old\n")
    LineStream(path).close()
    assert path.read_text() == ""


def test_a_file_that_is_no_gzip_stream_is_refused_and_left_whole(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl.gz"
    path.write_bytes(b'{"i":1}\n{"i":2}\n')  # a plain stream under the compressed stream's name
    with pytest.raises(OutputError, match="expected a gzip stream to continue"):
        trim_partial_tail(path, compress=True)
    with pytest.raises(OutputError):
        LineStream(path, keep=True, compress=True)
    assert path.read_bytes() == b'{"i":1}\n{"i":2}\n'


def test_a_gzip_stream_cut_inside_its_first_member_is_emptied(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"i":1}\n')[:1])  # killed one byte into the first member
    trim_partial_tail(path, compress=True)
    assert path.read_bytes() == b""


@pytest.mark.parametrize("compress", [False, True])
def test_a_symlink_at_the_path_is_replaced_never_read_or_written_through(tmp_path: Path, compress: bool) -> None:
    """Regression: a resumed run appended its log into whatever file a link at the log's path named."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    for keep in (False, True):
        path = tmp_path / f"keep-{keep}.jsonl"
        path.symlink_to(victim)
        stream = LineStream(path, keep=keep, compress=compress)
        stream.write("{}\n")
        stream.close()
        assert not path.is_symlink()
        assert (gzip.decompress(path.read_bytes()) if compress else path.read_bytes()) == b"{}\n"
    assert victim.read_text() == "the user's own file\n"


@pytest.mark.parametrize("how", ["file deleted", "folder deleted", "file replaced", "folder moved"])
def test_a_stream_whose_file_is_gone_from_its_path_fails_its_next_write_naming_it(tmp_path: Path, how: str) -> None:
    """Writes into a deleted or replaced file succeed and reach nobody: the stream says so instead."""
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "run.events.jsonl"
    stream = LineStream(path)
    stream.write('{"a":1}\n')
    stream.flush()
    if how == "file deleted":
        path.unlink()
    elif how == "folder deleted":
        path.unlink()
        folder.rmdir()
    elif how == "file replaced":
        path.unlink()
        path.write_text('{"mine":1}\n')
    else:
        folder.rename(tmp_path / "moved")
    stream.write('{"a":2}\n')
    with pytest.raises(OSError, match="deleted or replaced while the run was writing it") as caught:
        stream.flush()
    assert caught.value.filename == str(path)
    stream.close()  # nothing left to write: closes without a second error
    if how == "file replaced":
        assert path.read_text() == '{"mine":1}\n'  # the file now at the path is not written into
    if how == "folder moved":
        assert (tmp_path / "moved" / path.name).read_text() == '{"a":1}\n'
