"""Append-only JSON-lines files, plain or gzip, written in whole lines so a kill never leaves half a line.

Lines are buffered and written by ``flush()`` in one ``write`` of whole lines. A gzip stream is a series of
complete gzip members, one per flush: ``zcat``, ``gzip -dc``, Python's ``gzip`` module and ``jq`` (through
``zcat``) read the whole file, and a file cut after any member is still a valid stream. Only a kill inside
one write can leave a broken tail; continuing the file (a resumed run) cuts it back to the last whole line
or member first.
"""

from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

from fedevents.engine.errors import OutputError

from .atomic import NO_FOLLOW, drop_link, name_failure, still_in_place, trim_partial_line

__all__ = ["LineStream", "trim_partial_tail"]

_GZIP_WBITS = 31  # zlib's gzip container
_GZIP_LEVEL = 6
_GZIP_MAGIC = b"\x1f\x8b"  # the first two bytes of every gzip member


class LineStream:
    """Appends text lines to ``path`` (gzip members when ``compress``); ``keep=True`` continues the file.

    ``write`` takes text ending in newlines, as a text file does; it is thread-safe, since training
    threads log too. Text waits in memory until ``flush()`` or until ``buffer_bytes`` are waiting.
    """

    def __init__(self, path: Path, *, keep: bool = False, compress: bool = False,
                 buffer_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.compress = compress
        self._limit = buffer_bytes if buffer_bytes is not None else (1 << 20 if compress else 1 << 16)
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._lock = threading.Lock()
        drop_link(self.path)
        if keep and self.path.exists():
            trim_partial_tail(self.path, compress=compress)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | NO_FOLLOW)
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NO_FOLLOW, 0o644)

    def write(self, text: str) -> int:
        """Queue ``text`` (whole lines); write when the buffer is full."""
        with self._lock:
            self._pending.append(text)
            self._pending_bytes += len(text)
            if self._pending_bytes >= self._limit:
                self._write_pending()
        return len(text)

    def flush(self) -> None:
        """Write every queued line to the file."""
        with self._lock:
            self._write_pending()

    def close(self) -> None:
        """Flush and close; safe to repeat."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                self._write_pending()
            finally:
                os.close(self._fd)
                self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _write_pending(self) -> None:
        if not self._pending or self._fd < 0:
            return
        data = "".join(self._pending).encode("utf-8")
        self._pending.clear()
        self._pending_bytes = 0
        if self.compress:
            packer = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
            data = packer.compress(data) + packer.flush()
        view = memoryview(data)
        try:
            still_in_place(self._fd, self.path)
            while view:  # a nearly full disk takes part of a write; the next part then fails with ENOSPC
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise name_failure(exc, self.path)


def trim_partial_tail(path: Path, *, compress: bool) -> None:
    """Cut ``path`` back to its last whole line (plain) or its last whole gzip member (``compress``); does
    nothing where the file cannot be written (a read-only disk: a resume trims it later).

    A file to continue as a gzip stream that does not begin as one (a plain stream renamed, another file
    in its place) is not a cut tail: it is refused with an ``OutputError`` and left as it is.
    """
    if not compress:
        trim_partial_line(path)
        return
    try:
        data = path.read_bytes()
        if data and not data.startswith(_GZIP_MAGIC[: len(data)]):
            raise OutputError(f"{path}: expected a gzip stream to continue, found {data[:16]!r}; move it away "
                              "and run the same command with --resume")
        keep = _whole_members(data)
        if keep < len(data):
            with open(path, "r+b") as f:
                f.truncate(keep)
    except OSError:
        pass


def _whole_members(data: bytes) -> int:
    """The length of the prefix of ``data`` made of complete gzip members."""
    end = 0
    while end < len(data):
        unpacker = zlib.decompressobj(_GZIP_WBITS)
        try:
            unpacker.decompress(data[end:])
        except zlib.error:
            break
        if not unpacker.eof:
            break
        end = len(data) - len(unpacker.unused_data)
    return end
