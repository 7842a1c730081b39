"""A sink that cannot write: the logs folder fills up or turns read-only in the middle of a run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from .conftest import experiment, fedevents, record

FILLER = '''
import subprocess
from pathlib import Path

class Spoil:
    """On the event `at` of `round`, fills the file system of `folder` to the last byte, or turns it read-only
    (a read-only bind mount over it: files opened before stay writable, as Linux allows nothing else)."""
    def __init__(self, folder, round, how, at="RoundStarted"):
        self.folder, self.round, self.how, self.at, self.done = Path(folder), round, how, at, False
    def subscribe(self, bus):
        from fedevents import engine
        return [bus.subscribe(getattr(engine, self.at), self)]
    def __call__(self, ev):
        if self.done or ev.round != self.round:
            return
        self.done = True
        if self.how == "read-only":
            subprocess.run(["mount", "--bind", "-o", "ro", str(self.folder), str(self.folder)], check=True)
            return
        f = open(self.folder / "filler", "wb", buffering=0)
        try:
            while True:
                f.write(b"\\0" * 4096)
        except OSError:
            f.close()
'''

SIZE = "4m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/logs`` as a small tmpfs of its own; skipped where mounting is not permitted."""
    logs = tmp_path / "logs"
    logs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(logs)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield logs
    finally:
        subprocess.run(["umount", "-l", str(logs)], capture_output=True)


def parses(path: Path) -> None:
    """Every file fedevents wrote parses; the trace may lack its closing bracket, which its format allows."""
    text = path.read_text()
    if path.name.endswith(".jsonl"):
        assert text == "" or text.endswith("\n"), f"{path.name} ends in half a line"
        for line in text.splitlines():
            json.loads(line)
    elif path.name.endswith(".trace.json"):
        body = text.rstrip()
        json.loads(body if body.endswith("]") else body.rstrip(",") + "]")
    else:
        json.loads(text)


def checkpointed_rounds(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (folder / "ckpts").rglob("round-*.pt"))


@pytest.mark.parametrize("how", [pytest.param("full", marks=pytest.mark.slow), "read-only"])  # full: CI only
def test_a_logs_folder_that_cannot_be_written_stops_the_run_and_resume_completes_it(
        tmp_path: Path, small_disk: Path, reference: Path, how: str) -> None:
    exp = experiment(tmp_path)
    (tmp_path / "spoil.py").write_text(FILLER)
    spoil = {"target": "spoil:Spoil", "kwargs": {"folder": str(small_disk), "round": 4, "how": how}}
    run = fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(spoil)}]", cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    [line] = [line for line in run.stderr.splitlines() if line.startswith("fedevents:")]
    why = "No space left on device" if how == "full" else "Read-only file system"
    assert line.startswith("fedevents: error: ") and f"cannot write {small_disk}/" in line and why in line
    assert line.endswith("make room (or make it writable) and run the same command with --resume")
    assert "sink failed" not in run.stderr
    for path in small_disk.iterdir():
        assert not path.name.endswith(".tmp")
        if path.name != "filler":
            parses(path)
    rec = record(tmp_path)
    # The record holds every round before the failure; no checkpoint is ahead of it.
    assert rec["last_round"] == 3 and checkpointed_rounds(tmp_path)[-1] == 3

    if how == "full":
        (small_disk / "filler").unlink()
    else:
        subprocess.run(["umount", str(small_disk)], check=True)  # the read-only bind; the tmpfs stays
    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    rec, ref = record(tmp_path), record(reference)
    assert rec["status"] == "finished"
    assert (rec["data"], rec["comm"]) == (ref["data"], ref["comm"])
    for path in small_disk.iterdir():
        parses(path)


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_a_record_left_unfinished_by_a_full_disk_is_completed_by_resume(
        tmp_path: Path, small_disk: Path, reference: Path) -> None:
    exp = experiment(tmp_path)
    (tmp_path / "spoil.py").write_text(FILLER)
    # After round 7's record and before its checkpoint: the final "finished" cannot be written.
    spoil = {"target": "spoil:Spoil", "kwargs": {"folder": str(small_disk), "round": 7, "how": "full",
                                                  "at": "RoundFinished"}}
    run = fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(spoil)}]", cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    rec = record(tmp_path)
    assert (rec["status"], rec["last_round"], checkpointed_rounds(tmp_path)[-1]) == ("running", 7, 7)
    (small_disk / "filler").unlink()
    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "record was not completed; completing it" in resumed.stderr and "already finished" not in resumed.stderr
    rec, ref = record(tmp_path), record(reference)
    assert rec["status"] == "finished"
    assert (rec["data"], rec["comm"]) == (ref["data"], ref["comm"])
    again = fedevents("run", str(exp), "--resume", cwd=tmp_path)  # now there is nothing left to do
    assert again.returncode == 0 and "already finished" in again.stderr
    assert record(tmp_path) == rec


REMOVER = '''
import shutil
from pathlib import Path

class Remove:
    """On RoundStarted of `round`, deletes `folder` with everything in it, as a careless clean-up would."""
    def __init__(self, folder, round):
        self.folder, self.round = Path(folder), round
    def subscribe(self, bus):
        from fedevents import engine
        return [bus.subscribe(engine.RoundStarted, self)]
    def __call__(self, ev):
        if ev.round == self.round:
            shutil.rmtree(self.folder)
'''


def test_a_logs_folder_deleted_under_a_run_stops_it_and_resume_completes_the_record(
        tmp_path: Path, reference: Path) -> None:
    """The open files would take every later write without complaint and reach nobody: the run would end
    "finished" with its log, events and trace gone. It stops at the round's flush instead."""
    exp = experiment(tmp_path)
    (tmp_path / "remove.py").write_text(REMOVER)
    remove = {"target": "remove:Remove", "kwargs": {"folder": str(tmp_path / "logs"), "round": 4}}
    run = fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(remove)}]", cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    [line] = [line for line in run.stderr.splitlines() if line.startswith("fedevents:")]
    assert line.startswith(f"fedevents: error: cannot write {tmp_path / 'logs'}/"), line
    assert line.endswith("the run stopped before the round's checkpoint: run the same command with --resume")
    assert checkpointed_rounds(tmp_path)[-1] == 3  # round 4's checkpoint did not run ahead

    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    rec, ref = record(tmp_path), record(reference)
    assert rec["status"] == "finished"
    assert (rec["data"], rec["comm"]) == (ref["data"], ref["comm"])
    for path in (tmp_path / "logs").iterdir():
        parses(path)
