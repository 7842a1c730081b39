"""One signal ends a run even when a sync handler never returns and so holds the event loop itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedevents.engine.experiment import ABANDON_AFTER_S

from .conftest import experiment, fedevents, record

# Real `fedevents run` processes, killed and resumed: CI runs these (`make test-slow`), `make test` does not.
pytestmark = pytest.mark.slow

STUCK = '''
import os, signal, time

class Stuck:
    """A sync handler that sends `signal` once on RoundStarted of `round`, then never returns."""
    def __init__(self, round, signal):
        self.round, self.signal = round, signal
    def subscribe(self, bus):
        from fedevents.engine import RoundStarted
        return [bus.subscribe(RoundStarted, self)]
    def __call__(self, ev):
        if ev.round != self.round:
            return
        with open("signalled_at", "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), getattr(signal, self.signal))
        while True:
            time.sleep(0.05)
'''

# The same run through the Python API, on either event-loop backend.
BY_API = '''
import sys
from fedevents.cli import build_experiment
exp = build_experiment(sys.argv[1], overrides=["handlers=" + sys.argv[2]])
exp.run(backend=sys.argv[3])
'''


def _stuck(folder: Path, sig: str) -> tuple[Path, str]:
    exp = experiment(folder)
    (folder / "stuck_handler.py").write_text(STUCK)
    handler = {"target": "stuck_handler:Stuck", "kwargs": {"round": 3, "signal": sig}}
    return exp, json.dumps([handler])


def _check(folder: Path, run: subprocess.CompletedProcess[str], sig: str) -> None:
    took = time.time() - float((folder / "signalled_at").read_text())
    assert run.returncode == 128 + getattr(signal, sig), run.stderr
    assert f"fedevents: interrupted: interrupted by {sig} in round 3; a handler held the event loop" in run.stderr
    assert "Traceback" not in run.stderr
    rec = record(folder)
    assert rec["status"] == "interrupted"
    assert rec["error"] == f"stopped by {sig}; resume from round 2"
    assert ABANDON_AFTER_S <= took < ABANDON_AFTER_S + 20


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_one_signal_ends_a_run_whose_sync_handler_never_returns(tmp_path: Path, sig: str) -> None:
    exp, handlers = _stuck(tmp_path, sig)
    run = fedevents("run", str(exp), "--set", f"handlers={handlers}", cwd=tmp_path, timeout=120)
    _check(tmp_path, run, sig)


def test_the_same_on_trio(tmp_path: Path) -> None:
    exp, handlers = _stuck(tmp_path, "SIGINT")
    run = subprocess.run([sys.executable, "-c", BY_API, str(exp), handlers, "trio"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    _check(tmp_path, run, "SIGINT")


def test_a_resume_after_it_finishes_the_run(tmp_path: Path) -> None:
    exp, handlers = _stuck(tmp_path, "SIGTERM")
    fedevents("run", str(exp), "--set", f"handlers={handlers}", cwd=tmp_path, timeout=120)
    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert record(tmp_path)["status"] == "finished"
