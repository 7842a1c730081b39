"""One process per run: a run's checkpoint folder is locked (``flock``) by the process running it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Iterable

from fedevents.engine.errors import ConfigError

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = "lock"


class RunLock:
    """An exclusive lock on ``<folder>/lock`` and on ``folder`` itself, held until ``release()`` or the end
    of the process.

    The kernel drops a ``flock`` when its holder dies, so a killed run never leaves its folder locked. The
    folder is locked too because a lock file can be deleted under its holder: a second process would then
    create and lock a new one, and two processes would write one run.
    """

    def __init__(self, folder: Path, fds: tuple[int, ...]) -> None:
        self.folder = folder
        self._fds = fds

    @classmethod
    def acquire(cls, folder: Path, where: str) -> RunLock:
        """Lock ``folder`` (created if needed), or refuse in one line when another process holds it."""
        fds: list[int] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # The folder first: a refused process then creates nothing, not even a lock file deleted meanwhile.
            for path, flags in ((folder, os.O_RDONLY | os.O_DIRECTORY),
                                (folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)):
                fds.append(os.open(path, flags | os.O_CLOEXEC, 0o644))
                fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _close(fds)
            raise ConfigError(f"{where}: cannot run {folder.name}: expected no other process running it, found "
                              f"its lock {folder / LOCK_NAME} held by one") from None
        except OSError as exc:
            _close(fds)
            raise ConfigError(f"{where}: checkpoints_dir: expected a writable directory, found {folder} "
                              f"({exc.strerror or exc})") from None
        return cls(folder, tuple(fds))

    @staticmethod
    def held(folder: Path) -> bool:
        """Tell whether some process holds ``folder``'s lock now."""
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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
        _close(self._fds)
        self._fds = ()


def _close(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)
