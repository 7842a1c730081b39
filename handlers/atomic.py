"""Writing a file so that a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["write_atomic", "write_text_atomic"]


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
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def write_text_atomic(path: Path, text: str) -> None:
    """``write_atomic`` of UTF-8 text."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
