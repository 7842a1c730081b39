"""Helpers for reliability tests: a small experiment, real `fedevents run` subprocesses, record reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedevents.engine import read_events

ROOT = Path(__file__).resolve().parents[2]

KILLER = '''
import os, signal
from fedevents.engine import ALL

class Killer:
    """Sends `signal` to this process when an event of type `at` (in `round`, n-th match) is emitted."""
    def __init__(self, at, round, nth=1, signal="SIGKILL", twice=False, priority=0):
        self.at, self.round, self.nth, self.signal, self.twice, self.priority = at, round, nth, signal, twice, priority
        self.seen = 0
    def subscribe(self, bus):
        return [bus.subscribe(ALL, self, priority=self.priority)]
    def __call__(self, ev):
        if type(ev).__name__ == "ExperimentInterrupted" and self.twice:
            os.kill(os.getpid(), getattr(signal, self.signal))
        if type(ev).__name__ == self.at and getattr(ev, "round", None) == self.round:
            self.seen += 1
            if self.seen == self.nth:
                os.kill(os.getpid(), getattr(signal, self.signal))

class KillDuringOverlappedWrite:
    """Kills the process while the next round trains and `round`'s checkpoint is still being written in the
    background: its pack is on disk, its manifest write is held until the kill."""
    def __init__(self, round):
        import threading
        import fedevents.handlers.checkpoint as ck  # where checkpoint files are written
        self.round, self.writing = round, threading.Event()
        real = ck.write_atomic
        def held(path, write):
            if str(path).endswith(f"round-{round:06d}.pt"):
                self.writing.set()
                threading.Event().wait(60)  # the kill comes first
            return real(path, write)
        ck.write_atomic = held
    def subscribe(self, bus):
        from fedevents.engine.events import TrainStarted
        return [bus.subscribe(TrainStarted, self)]
    def __call__(self, ev):
        if ev.round == self.round + 1 and self.writing.wait(60):
            os.kill(os.getpid(), signal.SIGKILL)

class FailTraining:
    """Makes every training of `client` raise, as a broken client would."""
    def __init__(self, client):
        self.client = client
    def subscribe(self, bus):
        from fedevents.engine.events import ClientDispatched
        return [bus.subscribe(ClientDispatched, self, work=True, priority=10)]
    def __call__(self, ev):
        if ev.client == self.client:
            raise RuntimeError(f"{self.client} is broken")

class KillInCheckpointRename:
    """Kills the process after a checkpoint's temporary file is written, before it is renamed."""
    def __init__(self, round):
        import fedevents.handlers.atomic as ck  # where checkpoints are renamed into place
        real = os
        class _Os:
            def __getattr__(self, name):
                return getattr(real, name)
            def replace(self, src, dst):
                if str(dst).endswith(f"round-{round:06d}.pt"):
                    real.kill(real.getpid(), signal.SIGKILL)
                return real.replace(src, dst)
        ck.os = _Os()
    def subscribe(self, bus):
        return []
'''

#: A handler, as a module's text, that copies every checkpoint's manifest into ``into`` as it is saved (a
#: finished run keeps only its last checkpoint); test modules append their own handlers to it.
KEEPER = '''
import shutil
from pathlib import Path

class Keeper:
    """Copies every checkpoint's manifest into `into` once it is saved (a finished run keeps only its last)."""
    def __init__(self, into):
        self.into = Path(into)
        self.into.mkdir(parents=True, exist_ok=True)
    def subscribe(self, bus):
        from fedevents.engine.events import CheckpointSaved
        return [bus.subscribe(CheckpointSaved, self)]
    def __call__(self, ev):
        shutil.copy(ev.path, self.into / Path(ev.path).name)
'''


def experiment(folder: Path, **exp_opts: Any) -> Path:
    """A small FedAvg experiment in ``folder`` (7 rounds, validation every 2) and the kill helpers beside it."""
    data = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    data["exp_opts"].update({"comm_rounds": 7, "val_interval": 2, **exp_opts})
    data["task_opts"]["synthetic"].update(samples_per_client=64, test_size=32)
    data.update(logs_dir=str(folder / "logs"), checkpoints_dir=str(folder / "ckpts"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "killer.py").write_text(KILLER)
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fedevents(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "fedevents.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def record(folder: Path) -> dict[str, Any]:
    (path,) = [p for p in (folder / "logs").glob("*.json") if not p.name.endswith(".trace.json")]
    return json.loads(path.read_text())


def events(folder: Path) -> list[dict[str, Any]]:
    (path,) = (folder / "logs").glob("*.events.jsonl")
    return list(read_events(path))


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the small experiment, to compare resumed runs with."""
    folder = tmp_path_factory.mktemp("reference")
    run = fedevents("run", str(experiment(folder)), cwd=folder)
    assert run.returncode == 0, run.stderr
    return folder
