"""`fedevents run` as a user runs it: real subprocesses, real files, exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedevents.engine import read_events

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--set", "exp_opts.comm_rounds=3", "--set", "task_opts.synthetic.samples_per_client=64",
         "--set", "task_opts.synthetic.test_size=32"]


def fedevents(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "fedevents.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_demo_runs_and_writes_record_log_and_traces(tmp_path: Path) -> None:
    run = fedevents("run", str(ROOT / "configs/demo.yaml"), "--logs-dir", str(tmp_path / "logs"), *SMALL, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "round 3/3" in run.stderr and "experiment demo finished" in run.stderr
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    stem = files[0].split(".")[0]
    assert files == [f"{stem}.events.jsonl", f"{stem}.json", f"{stem}.log.jsonl", f"{stem}.trace.json"]
    record = json.loads((tmp_path / "logs" / f"{stem}.json").read_text())
    assert record["config"]["exp_name"] == "demo" and record["status"] == "finished"
    some_client = next(iter(record["data"].values()))
    assert all(r.isdigit() for r in some_client)
    trained = [m for c in record["data"].values() for r in c.values() for m in r.values() if "tr_acc" in m]
    assert trained and all(0.0 <= m["tr_acc"] <= 1.0 for m in trained)
    trace = json.loads((tmp_path / "logs" / f"{stem}.trace.json").read_text())
    assert any(e.get("ph") == "X" and e["name"].startswith("train ") for e in trace)  # JSON array form


def test_dry_run_prints_a_summary_and_writes_the_trace_without_training(tmp_path: Path) -> None:
    run = fedevents("run", str(ROOT / "configs/demo.yaml"), "--dry-run", "--logs-dir", str(tmp_path / "logs"),
                    "--device", "cuda:0", "--device", "cuda:1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "dry run of demo: 12 rounds, 10 clients (5 online per round), 2 device(s) x 2 slot(s)" in out
    assert "cuda:0/slot0" in out and "cuda:1/slot1" in out and "predicted makespan" in out
    events = list(read_events(next((tmp_path / "logs").glob("*.events.jsonl"))))
    done = [e for e in events if e["event"] == "TrainDone"]
    assert len(done) == 12 * 5 and all(e["metrics"] == {} for e in done)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "exp_opts.online_clients=50"], "exp_opts.online_clients = 50, but only 10 clients are defined"),
        (["--set", "exp_method=fedsgd"], "exp_method: expected one of baseline, "),
        (["--set", "exp_method=fedsgd"], ", found 'fedsgd' (string)"),
        (["--set", "exp_opts.comm_round=3"], "exp_opts.comm_round: unknown key; did you mean 'comm_rounds'?"),
        (["--parallel", "0"], "parallel: expected an integer >= 1, found 0 (integer)"),
        (["--device", "cuda:3"], "device 'cuda:"),
        (["--set", "datasets_dir=/definitely/missing"], "datasets_dir: expected an existing directory"),
        (["--set", "handlers=['no_such_module:Thing']"], "handlers[0]: could not import 'no_such_module'"),
        (["--executor", "gpu"], "argument --executor: invalid choice: 'gpu'"),
        (["--set", "executor=processes"], "executor: expected one of process, ray, thread, found 'processes'"),
        (["--set", "exp_opts.precision=fp16"], "exp_opts.precision: expected one of bf16, fp32, found 'fp16'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_creates_no_files(tmp_path: Path, args: list[str], message: str) -> None:
    if args == ["--device", "cuda:3"]:
        import torch

        if torch.cuda.device_count() > 3:
            pytest.skip("this machine has a cuda:3")
    run = fedevents("run", str(ROOT / "configs/demo.yaml"), "--logs-dir", str(tmp_path / "logs"), *args, cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedevents: error: "), run.stderr
    assert message in lines[0]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow  # thread and process executors each run the demo: run by CI (`make test-slow`), not `make test`
def test_the_process_executor_runs_the_demo_from_the_command_line(tmp_path: Path) -> None:
    runs = {}
    for executor in ("thread", "process"):
        run = fedevents("run", str(ROOT / "configs/demo.yaml"), "--executor", executor, "--parallel", "2",
                        "--logs-dir", str(tmp_path / executor), *SMALL, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        record = next(p for p in (tmp_path / executor).glob("*.json") if ".trace" not in p.name)
        runs[executor] = json.loads(record.read_text())
    assert runs["process"]["config"]["executor"] == "process"
    assert runs["process"]["data"] == runs["thread"]["data"]


@pytest.mark.slow  # three runs of the demo: run by CI (`make test-slow`), not `make test`
def test_bf16_reaches_the_workers_of_every_executor(tmp_path: Path) -> None:
    """exp_opts.precision is read by the worker from the config, so a worker process trains as a thread does."""
    data = {}
    for name, args in {"thread": ["--executor", "thread"], "process": ["--executor", "process"],
                       "fp32": ["--executor", "thread", "--set", "exp_opts.precision=fp32"]}.items():
        precision = [] if name == "fp32" else ["--set", "exp_opts.precision=bf16"]
        run = fedevents("run", str(ROOT / "configs/demo.yaml"), *args, *precision, "--parallel", "2",
                        "--logs-dir", str(tmp_path / name), *SMALL, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        record = next(p for p in (tmp_path / name).glob("*.json") if ".trace" not in p.name)
        data[name] = json.loads(record.read_text())["data"]
    assert data["process"] == data["thread"]
    assert data["thread"] != data["fp32"]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    run = fedevents("run", str(ROOT / "configs/demo.yaml"), "--set", "parallel=0", "--debug", cwd=tmp_path)
    assert run.returncode == 2
    assert "Traceback" in run.stderr and "fedevents: error: " in run.stderr


def test_unwritable_logs_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    run = fedevents("run", str(ROOT / "configs/demo.yaml"), "--logs-dir", str(blocker / "logs"), cwd=tmp_path)
    assert run.returncode == 2
    assert "logs_dir: expected a writable directory" in run.stderr
    assert blocker.read_text() == "not a dir"


def test_common_file_and_several_experiments_run_in_order(tmp_path: Path) -> None:
    exp2 = tmp_path / "second.yaml"
    data = yaml.safe_load((ROOT / "configs/fedavg.yaml").read_text())
    exp2.write_text(yaml.safe_dump({**data, "exp_name": "second"}))
    run = fedevents("run", str(ROOT / "configs/fedavg.yaml"), str(exp2), "--common", str(ROOT / "configs/common.yaml"),
                    "--logs-dir", str(tmp_path / "logs"), "--set", "exp_opts.comm_rounds=2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    records = sorted(p.name.split("-2")[0] for p in (tmp_path / "logs").glob("*.json") if not p.name.endswith("trace.json"))
    assert records == ["fedavg-5clients", "second"]


def test_failing_handler_from_yaml_fails_the_run_cleanly_with_exit_1(tmp_path: Path) -> None:
    (tmp_path / "explode.py").write_text(
        "from fedevents.engine import ClientDispatched\n"
        "class Explode:\n"
        "    def subscribe(self, bus):\n"
        "        async def boom(ev):\n"
        "            if ev.round == 2 and ev.client == 'client-3':\n"
        "                raise RuntimeError('injected failure')\n"
        "        return [bus.subscribe(ClientDispatched, boom, work=True, priority=10)]\n"
    )
    data = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    data.update(logs_dir=str(tmp_path / "logs"), handlers=["explode:Explode"])
    data["exp_opts"].update(comm_rounds=3, online_clients=10)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    run = fedevents("run", str(tmp_path / "exp.yaml"), cwd=tmp_path)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last == "fedevents: error: client client-3 failed in round 2 while training: RuntimeError: injected failure"
    record = json.loads(next(p for p in (tmp_path / "logs").glob("*.json") if ".trace" not in p.name).read_text())
    assert record["status"] == "failed"
    assert "1" in record["data"]["client-0"]  # round 1 results were flushed
    events = list(read_events(next((tmp_path / "logs").glob("*.events.jsonl"))))
    assert events[-1]["event"] == "ExperimentFailed"
    log = next((tmp_path / "logs").glob("*.log.jsonl")).read_text()
    assert "injected failure" in log and "Traceback" in log
