"""Running a benchmark's command as a whole process: its wall and CPU time and the peak RSS of its tree."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Bytes resident in process ``root`` and all its descendants now."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while being read
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * _PAGE
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


@dataclass(frozen=True)
class Finished:
    """How one command ran: wall-clock start and exit, its duration, CPU seconds and peak RSS (bytes)."""

    started: float
    exited: float
    wall_s: float
    cpu_s: float
    peak_rss: int


def run_sampled(command: list[str], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None,
                tail: int = 3000) -> Finished:
    """Run ``command`` with its output in ``log``, sampling its tree's RSS every 50 ms; a RuntimeError
    with the log's tail if it fails. CPU seconds are the command's and the descendants it waited for."""
    peak = 0
    with log.open("w") as out:
        started, start = time.time(), time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.05):
                peak = max(peak, tree_rss(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        exited, wall = time.time(), time.perf_counter() - start
        process.returncode = code = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}; see {log}:\n{log.read_text()[-tail:]}")
    return Finished(started, exited, wall, usage.ru_utime + usage.ru_stime, peak)
