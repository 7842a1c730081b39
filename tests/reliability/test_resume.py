"""A run killed with SIGKILL resumes with --resume and ends with the uninterrupted run's exact record."""

from __future__ import annotations

import json
import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from fedevents.engine.errors import ConfigError
from fedevents.handlers.checkpoint import load_checkpoint
from fedevents.handlers.runlock import RunLock

from .conftest import events, experiment, fedevents, record

KILL_POINTS = {
    "mid-training": {"target": "killer:Killer", "kwargs": {"at": "TrainStarted", "round": 3, "nth": 2}},
    "mid-validation": {"target": "killer:Killer", "kwargs": {"at": "ValStarted", "round": 4, "nth": 3}},
    "after-record-before-checkpoint": {"target": "killer:Killer",
                                        "kwargs": {"at": "RoundFinished", "round": 5, "priority": -10}},
    "mid-checkpoint-write": {"target": "killer:KillInCheckpointRename", "kwargs": {"round": 2}},
    "during-overlapped-write": {"target": "killer:KillDuringOverlappedWrite", "kwargs": {"round": 3}},
}


def shape(evs: list[dict]) -> list:
    """Event types and ids in order, each concurrent phase as a multiset."""
    out, phase = [], Counter()
    boundary = {"RoundStarted", "ClientsSampled", "UploadsClosed", "Aggregated", "RoundFinished", "CheckpointSaved",
                "ExperimentFinished"}
    for e in evs:
        key = (e["event"], e.get("round"), e.get("client"), e.get("task"), json.dumps(e.get("clients")))
        if e["event"] in boundary:
            if phase:
                out.append(phase)
                phase = Counter()
            out.append(key)
        else:
            phase[key] += 1
    return out


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_gives_the_uninterrupted_record(tmp_path: Path, reference: Path, point: str) -> None:
    exp = experiment(tmp_path)
    killed = fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(KILL_POINTS[point])}]", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = record(tmp_path)
    assert before["status"] == "running"  # a valid JSON file, as last written at a round's end

    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run" in resumed.stderr
    final, expected = record(tmp_path), record(reference)
    assert final["status"] == "finished"
    assert final["run_id"] == before["run_id"]
    assert final["data"] == expected["data"]  # every metric, to the last digit
    assert final["comm"] == expected["comm"]  # uploads and bytes, counted once each

    (stream,) = (tmp_path / "logs").glob("*.events.jsonl")
    lines = [json.loads(line) for line in stream.read_text().splitlines()]
    assert [i for i, line in enumerate(lines) if "event" not in line] == [0]  # its one header, still first
    assert lines[0] == {"stream": "fedevents.events", "schema": 1, "run_id": before["run_id"], "exp_name": "demo"}
    evs = events(tmp_path)
    restart = max(i for i, e in enumerate(evs) if e["event"] == "ExperimentStarted")
    assert evs[restart]["resumed"] is True
    first = evs[restart]["first_round"]
    ref = events(reference)
    start_ref = next(i for i, e in enumerate(ref) if e["event"] == "RoundStarted" and e["round"] == first)
    # A checkpoint is announced at the end of the round after its own, once written: the uninterrupted run
    # announces the one the resumed run started from, which the resumed run does not write again.
    ref = [e for e in ref[start_ref:] if not (e["event"] == "CheckpointSaved" and e["round"] < first)]
    assert shape(evs[restart + 1:]) == shape(ref)


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_a_kill_while_a_checkpoint_is_written_beside_the_next_round_resumes_from_the_one_before(
        tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    kill = KILL_POINTS["during-overlapped-write"]
    assert fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(kill)}]", cwd=tmp_path).returncode == -9
    (run_dir,) = (tmp_path / "ckpts").iterdir()
    assert sorted(p.name for p in run_dir.glob("round-*")) == ["round-000001.pt", "round-000002.pt"]
    assert "000003.pt" in {p.name for p in (run_dir / "packs").iterdir()}  # written, but no manifest uses it
    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "after round 2 from" in resumed.stderr


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_no_temporary_checkpoint_is_ever_loaded(tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    kill = KILL_POINTS["mid-checkpoint-write"]
    assert fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(kill)}]", cwd=tmp_path).returncode == -9
    (run_dir,) = (tmp_path / "ckpts").iterdir()
    names = sorted(p.name for p in run_dir.iterdir())
    assert "round-000002.pt.tmp" in names and "round-000002.pt" not in names
    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert "after round 1 from" in resumed.stderr


def test_resume_with_nothing_checkpointed_starts_over_and_says_so(tmp_path: Path, reference: Path) -> None:
    run = fedevents("run", str(experiment(tmp_path)), "--resume", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "no checkpoint under" in run.stderr and "starting from the beginning" in run.stderr
    assert record(tmp_path)["data"] == record(reference)["data"]


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_resume_refuses_a_changed_config_and_allows_more_rounds(tmp_path: Path) -> None:
    exp = experiment(tmp_path, comm_rounds=3)
    assert fedevents("run", str(exp), cwd=tmp_path).returncode == 0
    refused = fedevents("run", str(exp), "--resume", "--set", "optimizer_opts.lr=0.5",
                        "--set", "task_opts.batch_size=8", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "optimizer_opts.lr, task_opts.batch_size differ from the checkpoint (only exp_opts.comm_rounds, "
        "exp_opts.clients_in_memory, exp_opts.checkpoint_interval, exp_opts.checkpoint_keep, "
        "exp_opts.handler_timeout_s, exp_opts.val_reuse, device, parallel, executor, ray, group, "
        "logs_dir, checkpoints_dir, datasets_dir, handlers, dry_run_opts may change)")
    extended = fedevents("run", str(exp), "--resume", "--set", "exp_opts.comm_rounds=5", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr
    data = record(tmp_path)["data"]
    assert max(int(r) for client in data.values() for r in client) == 5


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_retention_keeps_the_last_k_checkpoints_and_a_finished_run_only_its_last(tmp_path: Path) -> None:
    exp = experiment(tmp_path, checkpoint_keep=2, checkpoint_interval=2)
    # Killed once round 6's checkpoint is announced (written), at the end of round 7, before round 7's.
    kill = {"target": "killer:Killer", "kwargs": {"at": "CheckpointSaved", "round": 6}}
    assert fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(kill)}]", cwd=tmp_path).returncode == -9
    (run_dir,) = (tmp_path / "ckpts").iterdir()
    assert sorted(p.name for p in run_dir.glob("round-*")) == ["round-000004.pt", "round-000006.pt"]
    assert fedevents("run", str(exp), "--resume", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["lock", "packs", "round-000007.pt"]
    # Only the packs the last checkpoint uses are left, and it loads from them.
    used = set(load_checkpoint(run_dir / "round-000007.pt").objects.values())
    assert sorted(p.name for p in (run_dir / "packs").iterdir()) == sorted(used)


def kill_at(tmp_path: Path, exp: Path, point: str = "after-record-before-checkpoint") -> None:
    killed = fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(KILL_POINTS[point])}]", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_resume_is_exact_when_spilled_clients_are_left_out_of_checkpoints(tmp_path: Path, reference: Path) -> None:
    """Checkpoints that export only changed clients, with most clients spilled to disk, still resume exactly."""
    exp = experiment(tmp_path, clients_in_memory=2)
    kill_at(tmp_path, exp)
    assert fedevents("run", str(exp), "--resume", cwd=tmp_path).returncode == 0
    final, expected = record(tmp_path), record(reference)
    assert (final["data"], final["comm"]) == (expected["data"], expected["comm"])


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_resume_is_exact_in_bf16(tmp_path: Path) -> None:
    """exp_opts.precision bf16 keeps every stored state in float32, so a killed bf16 run resumes to the
    uninterrupted bf16 run's record, and a resume that would change the precision is refused."""
    whole = fedevents("run", str(experiment(tmp_path / "whole", precision="bf16")), cwd=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    exp = experiment(tmp_path / "killed", precision="bf16")
    kill_at(tmp_path / "killed", exp)
    changed = fedevents("run", str(exp), "--resume", "--set", "exp_opts.precision=fp32", cwd=tmp_path / "killed")
    assert changed.returncode == 2 and "exp_opts.precision differs from the checkpoint" in changed.stderr
    assert fedevents("run", str(exp), "--resume", cwd=tmp_path / "killed").returncode == 0
    final, expected = record(tmp_path / "killed"), record(tmp_path / "whole")
    assert final["status"] == "finished"
    assert (final["data"], final["comm"]) == (expected["data"], expected["comm"])


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_resume_into_another_logs_dir_gives_the_whole_record(tmp_path: Path, reference: Path) -> None:
    """Regression: the resumed record lacked every round before the checkpoint when the logs moved."""
    exp = experiment(tmp_path)
    kill_at(tmp_path, exp)
    moved = tmp_path / "elsewhere"
    resumed = fedevents("run", str(exp), "--resume", "--logs-dir", str(moved / "logs"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    final, expected = record(moved), record(reference)
    assert (final["status"], final["data"], final["comm"]) == ("finished", expected["data"], expected["comm"])


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_resume_after_the_record_was_deleted_or_cut_gives_the_whole_record(tmp_path: Path, reference: Path) -> None:
    exp = experiment(tmp_path)
    kill_at(tmp_path, exp)
    (path,) = [p for p in (tmp_path / "logs").glob("*.json") if not p.name.endswith(".trace.json")]
    path.write_text(path.read_text()[:100])
    assert fedevents("run", str(exp), "--resume", cwd=tmp_path).returncode == 0
    final, expected = record(tmp_path), record(reference)
    assert (final["data"], final["comm"]) == (expected["data"], expected["comm"])


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_a_symlinked_record_is_replaced_never_read_or_written_through(tmp_path: Path, reference: Path) -> None:
    exp = experiment(tmp_path)
    kill_at(tmp_path, exp)
    (path,) = [p for p in (tmp_path / "logs").glob("*.json") if not p.name.endswith(".trace.json")]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"data": {"client-0": {"1": {"synth": {"val_acc": 9.0}}}}}))
    path.unlink()
    path.symlink_to(other)
    Path(f"{path}.tmp").symlink_to(tmp_path / "victim.txt")
    assert fedevents("run", str(exp), "--resume", cwd=tmp_path).returncode == 0
    assert not path.is_symlink() and not (tmp_path / "victim.txt").exists()
    assert json.loads(other.read_text())["data"]["client-0"]["1"]["synth"]["val_acc"] == 9.0
    assert record(tmp_path)["data"] == record(reference)["data"]


@pytest.mark.slow  # real `fedevents` processes (a killed run and its resume): run by CI, not by `make test`
def test_symlinks_at_the_log_events_and_trace_are_replaced_never_read_or_written_through(
        tmp_path: Path, reference: Path) -> None:
    """Regression: a resume appended the log and the trace into the files that links at their paths named
    (the user's own), and read a linked events file as its own, failing the run."""
    exp = experiment(tmp_path)
    kill_at(tmp_path, exp)
    victims = {}
    for suffix in (".log.jsonl", ".events.jsonl", ".trace.json"):
        (path,) = (tmp_path / "logs").glob(f"*{suffix}")
        victims[path] = tmp_path / f"victim{suffix}"
        victims[path].write_text("the user's own file\n")
        path.unlink()
        path.symlink_to(victims[path])
    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    for path, victim in victims.items():
        assert not path.is_symlink() and victim.read_text() == "the user's own file\n"
    assert json.loads(next((tmp_path / "logs").glob("*.trace.json")).read_text())
    assert [e["event"] for e in events(tmp_path)][-1] == "ExperimentFinished"
    assert record(tmp_path)["data"] == record(reference)["data"]


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_tolerated_failures_survive_a_resume(tmp_path: Path) -> None:
    """Regression: failures recorded under failure_policy tolerate vanished from the resumed record."""
    fail = {"target": "killer:FailTraining", "kwargs": {"client": "client-1"}}
    whole = tmp_path / "whole"
    exp = experiment(whole, failure_policy="tolerate", min_clients=1)
    assert fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(fail)}]", cwd=whole).returncode == 0
    expected = record(whole)
    assert expected["failures"]

    cut = tmp_path / "cut"
    exp = experiment(cut, failure_policy="tolerate", min_clients=1)
    both = json.dumps([fail, KILL_POINTS["after-record-before-checkpoint"]])
    assert fedevents("run", str(exp), "--set", f"handlers={both}", cwd=cut).returncode == -signal.SIGKILL
    resumed = fedevents("run", str(exp), "--resume", "--set", f"handlers=[{json.dumps(fail)}]", cwd=cut)
    assert resumed.returncode == 0, resumed.stderr
    final = record(cut)
    assert final["failures"] == expected["failures"]
    assert final["data"] == expected["data"]


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_a_second_process_resuming_the_same_run_is_refused(tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    kill_at(tmp_path, exp)
    (run_dir,) = (tmp_path / "ckpts").iterdir()
    holder = RunLock.acquire(run_dir, "test")  # as the first `--resume` process would hold it
    try:
        second = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    finally:
        holder.release()
    assert second.returncode == 2
    assert second.stderr.strip() == (f"fedevents: error: {exp}: cannot run {run_dir.name}: expected no other "
                                     f"process running it, found its lock {run_dir / 'lock'} held by one")
    assert fedevents("run", str(exp), "--resume", cwd=tmp_path).returncode == 0


def test_deleting_the_lock_file_does_not_unlock_a_running_run(tmp_path: Path) -> None:
    """Regression: with the lock file deleted under a running run, a second --resume locked a new one and
    both processes wrote the run (a failed record, a trace that no longer parsed)."""
    run_dir = tmp_path / "ckpts" / "demo-20261202-000000-abcdef"
    holder = RunLock.acquire(run_dir, "test")
    try:
        (run_dir / "lock").unlink()
        with pytest.raises(ConfigError, match="expected no other process running it"):
            RunLock.acquire(run_dir, "test")
        assert not (run_dir / "lock").exists()  # the refused one created nothing
    finally:
        holder.release()
    RunLock.acquire(run_dir, "test").release()


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_a_run_killed_before_its_first_checkpoint_is_finished_by_resume(tmp_path: Path, reference: Path) -> None:
    """Regression: its record stayed "running" forever, since --resume started another run."""
    exp = experiment(tmp_path)
    kill = {"target": "killer:Killer", "kwargs": {"at": "ValStarted", "round": 0, "nth": 2}}
    assert fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(kill)}]", cwd=tmp_path).returncode == -9
    before = record(tmp_path)
    assert before["status"] == "running"
    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"run {before['run_id']} stopped before its first checkpoint; starting it again" in resumed.stderr
    final = record(tmp_path)  # still one record: the same run, now finished
    assert (final["run_id"], final["status"]) == (before["run_id"], "finished")
    assert final["data"] == record(reference)["data"]


@pytest.mark.parametrize(("sig", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_stops_cleanly_marks_the_record_and_resumes(tmp_path: Path, reference: Path, sig: str,
                                                           status: int) -> None:
    exp = experiment(tmp_path)
    stop = {"target": "killer:Killer", "kwargs": {"at": "TrainStarted", "round": 4, "nth": 1, "signal": sig}}
    run = fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(stop)}]", cwd=tmp_path)
    assert run.returncode == status, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last == (f"fedevents: interrupted: interrupted by {sig} in round 4; "
                    "the same command with --resume continues from the checkpoint after round 3")
    rec = record(tmp_path)
    assert rec["status"] == "interrupted"
    assert events(tmp_path)[-1]["event"] == "ExperimentInterrupted"
    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert record(tmp_path)["data"] == record(reference)["data"]


def test_a_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    stop = {"target": "killer:Killer",
            "kwargs": {"at": "TrainStarted", "round": 2, "signal": "SIGINT", "twice": True}}
    run = fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(stop)}]", cwd=tmp_path)
    assert run.returncode == 130
    assert "SIGINT again; exiting now" in run.stderr
    json.loads(next(p for p in (tmp_path / "logs").glob("*.json") if ".trace" not in p.name).read_text())


@pytest.mark.slow  # real `fedevents` processes: run by CI (`make test-slow`), not by `make test`
def test_a_resume_refused_before_its_first_round_names_that_round(tmp_path: Path) -> None:
    """The events stream of another run in place: the resume stops at once, naming the round it was to run."""
    exp = experiment(tmp_path)
    kill_at(tmp_path, exp)  # in round 5: the resume starts after the last checkpoint that was whole
    (stream,) = (tmp_path / "logs").glob("*.events.jsonl")
    lines = stream.read_text().splitlines()
    header = json.loads(lines[0])
    stream.write_text("\n".join([json.dumps({**header, "run_id": "someone-else"}), *lines[1:]]) + "\n")
    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path)
    assert resumed.returncode == 1
    error = [line for line in resumed.stderr.splitlines() if line.startswith("fedevents: error:")]
    assert len(error) == 1 and "found those of run someone-else" in error[0], resumed.stderr
    after = int(re.search(r"resuming run \S+ after round (\d+)", resumed.stderr).group(1))
    assert after >= 3 and f"experiment demo failed in round {after + 1}:" in resumed.stderr, resumed.stderr
