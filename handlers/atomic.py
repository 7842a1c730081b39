"""Writing a file so that a reader sees the old version or the new one, never half of one; and what a
sink does when it cannot write at all."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import IO, Any, Callable

from fedevents.engine.errors import OutputError

__all__ = ["write_atomic", "write_text_atomic", "output_failed", "trim_partial_line", "close_quietly", "drop_link",
           "name_failure", "still_in_place", "NO_FOLLOW"]

#: Flags that make ``os.open`` refuse a symlink at the last component of the path (ELOOP).
NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Have ``write`` fill ``<path>.tmp``, flush it to disk, then rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was. A symlink at ``path`` or at
    the temporary name is replaced, never written through.
    """
    tmp = path.with_name(path.name + ".tmp")
    # A link planted at the temporary name would make the write land in its target: never follow one.
    tmp.unlink(missing_ok=True)
    try:
        with open(tmp, "xb", opener=_no_follow) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | NO_FOLLOW, 0o644)


def drop_link(path: Path) -> None:
    """Remove a symlink found where fedevents appends to one of its files, so that the file continued or
    started there is its own: the link's target is never read, cut back or written through."""
    if path.is_symlink():
        path.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """``write_atomic`` of UTF-8 text."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def output_failed(path: Path, exc: OSError) -> OutputError:
    """The one-line error of a sink that could not write ``path``, telling the user how to go on."""
    why = exc.strerror or str(exc)
    fix = "" if exc.errno == errno.ENOENT else "make room (or make it writable) and "
    return OutputError(f"cannot write {path}: {why}; the run stopped before the round's checkpoint: "
                       f"{fix}run the same command with --resume")


def still_in_place(fd: int, path: Path) -> None:
    """Raise ENOENT, naming ``path``, when the file open at ``fd`` is no longer the file at ``path``: it, or
    its folder, was deleted, moved or replaced while the run wrote it. Writes would still succeed, into a
    file nobody can read, and the run would end "finished" without it."""
    held = os.fstat(fd)
    try:
        there = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        there = None
    if held.st_nlink == 0 or there is None or (there.st_dev, there.st_ino) != (held.st_dev, held.st_ino):
        raise OSError(errno.ENOENT, "deleted or replaced while the run was writing it", str(path))


def name_failure(exc: OSError, path: Path) -> OSError:
    """``exc`` naming the file it failed on: a write to a descriptor does not say, and a sink that writes
    two files (the events and the trace) must report the one that failed."""
    if exc.filename is None:
        exc.filename = str(path)
    return exc


def close_quietly(stream: IO[Any] | None) -> None:
    """Close a stream whose writes failed; the close's own flush fails the same way and is not news."""
    if stream is None:
        return
    try:
        stream.close()
    except OSError:
        pass


def trim_partial_line(path: Path) -> None:
    """Cut an appended-to file back to its last complete line, so a write cut short leaves no half line.

    Does nothing where the file cannot be opened for writing (a read-only disk): a resume trims it later.
    """
    try:
        with open(path, "rb+") as f:
            size = end = f.seek(0, os.SEEK_END)
            while end > 0:
                step = min(end, 1 << 16)
                f.seek(end - step)
                newline = f.read(step).rfind(b"\n")
                if newline >= 0:
                    end = end - step + newline + 1
                    break
                end -= step
            if end < size:
                f.truncate(end)
    except OSError:
        pass
