"""A JSON array on disk that parses after every write, so a run killed at any point leaves a valid file.

The file holds one item per line between ``[`` and a closing ``]``. Appending writes the new items over the
closing bracket and puts it back after them, in one ``pwrite``: the bytes before the bracket are never
touched again. Only a kill inside that one write can leave a broken tail; opening the file to continue it
cuts the tail back to the last whole item and closes the array again, so earlier items always survive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedevents.engine.events import strict_json

from .atomic import NO_FOLLOW, drop_link, name_failure, still_in_place

__all__ = ["AppendArray", "repair_array"]

_CLOSE = b"\n]\n"
_encode = strict_json  # a NaN in a span's args is written as "NaN", never as a bare token


class AppendArray:
    """Appends items to the JSON array at ``path``; ``keep=True`` continues an existing file, else starts anew.

    Items are buffered and written by ``flush()`` (and by ``add`` once ``buffer_bytes`` are waiting).
    """

    def __init__(self, path: Path, *, keep: bool = False, buffer_bytes: int = 1 << 16) -> None:
        self.path = Path(path)
        self._limit = buffer_bytes
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.earlier: list[Any] = []  # the items already in a continued file
        drop_link(self.path)
        if keep and self.path.exists():
            self._tail, self.earlier = repair_array(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | NO_FOLLOW)
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NO_FOLLOW, 0o644)
            os.write(self._fd, b"[" + _CLOSE)
            self._tail = 1
        self._empty = not self.earlier

    def add(self, item: Any) -> None:
        """Queue ``item`` (JSON-safe) for the next flush."""
        self.add_text(_encode(item))

    def add_text(self, text: str) -> None:
        """Queue an item already written as JSON text (one line) for the next flush."""
        line = text.encode("utf-8")
        self._pending.append(line)
        self._pending_bytes += len(line) + 2
        if self._pending_bytes >= self._limit:
            self.flush()

    def flush(self) -> None:
        """Write the queued items before the closing bracket, which moves after them."""
        if not self._pending or self._fd < 0:
            return
        body = (b"\n" if self._empty else b",\n") + b",\n".join(self._pending)
        try:
            still_in_place(self._fd, self.path)
            os.pwrite(self._fd, body + _CLOSE, self._tail)
        except OSError as exc:
            raise name_failure(exc, self.path)
        self._tail += len(body)
        self._empty = False
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> None:
        """Flush and close; safe to repeat."""
        if self._fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1


def repair_array(path: Path) -> tuple[int, list[Any]]:
    """Make ``path`` a closed JSON array of its whole items; give the closing bracket's offset and the items.

    A file that parses is left as it is. Otherwise (a kill cut a write short, or an older trace without its
    closing bracket) it is cut back after its last whole line and closed again; what cannot be read at all
    becomes an empty array.
    """
    found = path.read_bytes()
    items = _parse(found)
    if items is None:
        data, items = _cut_to_whole_items(found)
        with open(path, "r+b") as f:
            if found.startswith(data):
                # The whole items stay where they are and only what follows them is rewritten, so a kill
                # in here leaves them for the next repair (emptying the file first would lose them all).
                f.seek(len(data))
                f.write(_CLOSE)
                f.truncate()
            else:
                f.truncate(0)
                f.write(data + _CLOSE)
        return len(data), items
    body = found.rstrip()[:-1].rstrip()  # without the closing bracket
    return len(body), items


def _parse(data: bytes) -> list[Any] | None:
    try:
        items = json.loads(data)
    except ValueError:
        return None
    return items if isinstance(items, list) else None


def _cut_to_whole_items(data: bytes) -> tuple[bytes, list[Any]]:
    """The longest prefix of whole lines that reads as an open array, and its items."""
    lines = data.split(b"\n")
    if not lines or lines[0].strip() != b"[":
        return b"[", []
    kept = 1
    items = []
    for line in lines[1:]:
        text = line.strip().rstrip(b",")
        try:
            items.append(json.loads(text))
        except ValueError:
            break
        kept += 1
    prefix = b"\n".join(lines[:kept]).rstrip().rstrip(b",")
    return prefix, items
