"""Every file a run writes parses after any chain of kills and resumes, and the trace keeps every round."""

from __future__ import annotations

import gzip
import json
import signal
from pathlib import Path

from .conftest import experiment, fedevents, record


def kill_at(at: str, round: int, nth: int = 1, sig: str = "SIGKILL", twice: bool = False) -> str:
    handler = {"target": "killer:Killer", "kwargs": {"at": at, "round": round, "nth": nth, "signal": sig,
                                                      "twice": twice}}
    return f"handlers=[{json.dumps(handler)}]"


def assert_every_file_parses(logs: Path) -> None:
    files = sorted(p for p in logs.iterdir() if p.is_file())
    assert files
    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        if ".jsonl" in path.name:
            for line in text.splitlines():
                json.loads(line)
        else:
            json.loads(text)


def trace_rounds(logs: Path) -> set[int]:
    (path,) = logs.glob("*.trace.json")
    spans = [e for e in json.loads(path.read_text()) if e["ph"] == "X"]
    return {int(e["name"].rsplit(" r", 1)[1].split()[0]) for e in spans}


def test_kills_during_resumes_leave_every_file_whole_and_the_trace_with_every_round(tmp_path: Path) -> None:
    """Killed in round 3, then killed again while resuming (round 4, the first resumed round, and a double
    Ctrl-C in round 5): after each stop every file parses; after the last resume the trace has all rounds."""
    exp = experiment(tmp_path)
    logs = tmp_path / "logs"
    stops = [
        (["--set", kill_at("TrainStarted", 3, nth=2)], -signal.SIGKILL),
        (["--resume", "--set", kill_at("ValStarted", 4, nth=1)], -signal.SIGKILL),
        (["--resume", "--set", kill_at("TrainStarted", 5, sig="SIGINT", twice=True)], 130),
    ]
    for args, status in stops:
        run = fedevents("run", str(exp), *args, cwd=tmp_path)
        assert run.returncode == status, run.stderr
        assert_every_file_parses(logs)
    done = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_every_file_parses(logs)
    assert record(tmp_path)["status"] == "finished"
    assert trace_rounds(logs) == set(range(0, 8))  # round 0 validates, rounds 1-7 train and validate
