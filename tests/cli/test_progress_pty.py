"""`fedevents run` on a terminal draws the live block; with --quiet (or off a terminal) the plain lines only."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

pyte = pytest.importorskip("pyte")

ROOT = Path(__file__).resolve().parents[2]
COLUMNS, LINES = 120, 40


def run_on_a_terminal(tmp_path: Path, *extra: str) -> tuple[int, list[str]]:
    """Run a 2-round demo with its output on a pseudo-terminal; give its exit status and the final screen."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    env = dict(os.environ, TERM="xterm", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedevents.cli", "run", str(ROOT / "configs/demo.yaml"), "--logs-dir",
         str(tmp_path / "logs"), "--set", "exp_opts.comm_rounds=2", "--set", "task_opts.synthetic.samples_per_client=64",
         *extra], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=tmp_path)
    os.close(slave)
    out = b""
    try:
        while select.select([master], [], [], 120)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        status = proc.wait(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    screen = pyte.Screen(COLUMNS, LINES)
    pyte.ByteStream(screen).feed(out)
    return status, [line.rstrip() for line in screen.display if line.strip()]


def test_a_terminal_shows_the_live_block_with_the_log_lines_above_it(tmp_path: Path) -> None:
    status, lines = run_on_a_terminal(tmp_path)
    assert status == 0
    block = next(i for i, line in enumerate(lines) if line.startswith("demo  round 2/2"))
    assert "elapsed 0:00:" in lines[block] and "ETA 0:00:00" in lines[block]
    assert lines[block + 1:block + 5] == [
        "  train    5/5 clients done",
        "  validate 10/10 clients done",
        "  cpu slot 0  idle",
        "  cpu slot 1  idle",
    ]
    assert any("round 1/2  clients 5 trained" in line for line in lines[:block])  # log lines print above
    assert any("experiment demo finished" in line for line in lines[block:])


def test_quiet_gives_the_plain_lines_only(tmp_path: Path) -> None:
    status, lines = run_on_a_terminal(tmp_path, "--quiet")
    assert status == 0
    assert not any("clients done" in line or "slot 0" in line for line in lines)
    assert any("round 2/2  clients 5 trained" in line for line in lines)
