"""`outputs:` chooses the files a run writes; `.gz` streams read back with gzip; bad lists are one line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fedevents.cli import build_experiment
from fedevents.engine import read_events
from fedevents.engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def dry_run(tmp_path: Path, outputs: str | None) -> list[str]:
    """The suffixes of the files a two-round dry run of the demo writes with ``outputs`` (None: the default)."""
    chosen = [] if outputs is None else [f"outputs={outputs}"]
    exp = build_experiment(ROOT / "configs/demo.yaml", dry_run=True, console=None, overrides=[
        f"logs_dir={tmp_path / 'logs'}", "exp_opts.comm_rounds=2", *chosen])
    exp.run()
    return sorted(p.name.split(".", 1)[1] for p in (tmp_path / "logs").iterdir())


def test_by_default_a_run_writes_record_log_events_and_trace(tmp_path: Path) -> None:
    assert dry_run(tmp_path, None) == ["events.jsonl", "json", "log.jsonl", "trace.json"]


def test_an_empty_list_leaves_the_record_alone(tmp_path: Path) -> None:
    assert dry_run(tmp_path, "[]") == ["json"]


def test_compressed_streams_hold_the_same_lines(tmp_path: Path) -> None:
    assert dry_run(tmp_path / "gz", "[log.gz, events.gz]") == ["events.jsonl.gz", "json", "log.jsonl.gz"]
    assert dry_run(tmp_path / "plain", "[log, events]") == ["events.jsonl", "json", "log.jsonl"]
    (gz,) = (tmp_path / "gz" / "logs").glob("*.events.jsonl.gz")
    (plain,) = (tmp_path / "plain" / "logs").glob("*.events.jsonl")
    with gzip.open(gz, "rt") as f:
        header = json.loads(f.readline())  # standard tools read the stream: its header first
    assert header == {"stream": "fedevents.events", "schema": 1, "run_id": gz.name.split(".")[0], "exp_name": "demo"}
    zipped = [e["event"] for e in read_events(gz)]
    assert zipped == [e["event"] for e in read_events(plain)]
    assert zipped[0] == "ExperimentStarted" and zipped[-1] == "ExperimentFinished"


@pytest.mark.parametrize(("outputs", "message"), [
    ("[events, events.gz]", "outputs: expected events at most once, found events, events.gz"),
    ("[record]", "outputs[0]: expected one of events, events.gz, log, log.gz, trace, found 'record'"),
])
def test_a_bad_outputs_list_is_one_line(tmp_path: Path, outputs: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_experiment(ROOT / "configs/demo.yaml", dry_run=True, console=None, overrides=[f"outputs={outputs}"])
    assert message in str(info.value)
