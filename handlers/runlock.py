"""One process per run: a run's checkpoint folder is locked (``flock``) by the process running it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fedevents.engine.errors import ConfigError

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = "lock"


class RunLock:
    """An exclusive lock on ``<folder>/lock``, held until ``release()`` or the end of the process.

    The kernel drops a ``flock`` when its holder dies, so a killed run never leaves its folder locked.
    """

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path, where: str) -> RunLock:
        """Lock ``folder`` (created if needed), or refuse in one line when another process holds it."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"{where}: checkpoints_dir: expected a writable directory, found {folder} "
                              f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{where}: cannot run {folder.name}: expected no other process running it, found "
                              f"its lock {folder / LOCK_NAME} held by one") from None
        return cls(folder, fd)

    @staticmethod
    def held(folder: Path) -> bool:
        """Tell whether some process holds ``folder``'s lock now."""
        try:
            fd = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        """Let another process run this run (safe to call twice)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
