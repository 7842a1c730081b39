"""Executors: the same record under every executor; a process executor's timeouts and dead workers."""

from __future__ import annotations

import json
import sys
import signal
import textwrap
from pathlib import Path

import pytest

from fedevents.cli import build_experiment
from fedevents.engine import ClientFailed, TrainDone, TrainStarted, UploadsClosed
from fedevents.engine.testing import EventRecorder
from fedevents.handlers import ClientWork
from fedevents.handlers.executors import ProcessExecutor, ThreadExecutor

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


def experiment(tmp_path: Path, name: str, **sets):
    overrides = {"exp_opts.comm_rounds": 3, "exp_opts.val_interval": 2, "exp_opts.online_clients": 4,
                 "task_opts.synthetic.samples_per_client": 48, "task_opts.synthetic.test_size": 24,
                 "logs_dir": str(tmp_path / name), "checkpoints_dir": str(tmp_path / name / "ckpts"), **sets}
    return build_experiment(ROOT / "configs/demo.yaml", overrides=[f"{k}={v}" for k, v in overrides.items()],
                            console=None)


async def test_the_process_executor_writes_the_thread_executors_record(tmp_path: Path) -> None:
    records = {}
    for executor, parallel in (("thread", 1), ("process", 2)):
        exp = experiment(tmp_path, executor, executor=executor, parallel=parallel)
        assert isinstance(exp.component(ClientWork).executor,
                          ThreadExecutor if executor == "thread" else ProcessExecutor)
        rec = EventRecorder(exp.bus)
        await exp.run_async()
        records[executor] = json.loads(exp.paths.record.read_text())
    assert records["process"]["status"] == "finished"
    assert records["process"]["data"] == records["thread"]["data"]
    assert records["process"]["comm"] == records["thread"]["comm"]
    # lines logged inside the worker processes reach the run's log, bound to their client and round
    lines = [json.loads(line) for line in exp.paths.log.read_text().splitlines()]
    epochs = [line for line in lines if line["event"] == "epoch finished"]
    trainings = [(e.round, e.client) for e in rec.of(TrainDone)]
    epochs_each = exp.config.data["task_opts"]["train_epochs"]
    assert sorted((line["round"], line["client"]) for line in epochs) == sorted(trainings * epochs_each)


SLOW_WORKER = '''
import os
import time

from fedevents.federated.worker import Worker


class SlowWorker(Worker):
    """Sleeps (or dies) in the training named by FEDEVENTS_TEST_VICTIM=client/round/action."""

    def train(self, job):
        client, rnd, action = os.environ["FEDEVENTS_TEST_VICTIM"].split("/")
        if (job.client, job.round) == (client, int(rnd)):
            if action == "die":
                os._exit(3)
            time.sleep(30)
        return super().train(job)
'''


def slow_process_executor(exp, tmp_path: Path, monkeypatch, victim: str) -> ProcessExecutor:
    """Swap ``exp``'s executor for processes running ``SlowWorker`` (spawned children inherit sys.path)."""
    (tmp_path / "slow_worker.py").write_text(textwrap.dedent(SLOW_WORKER))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FEDEVENTS_TEST_VICTIM", victim)
    work = exp.component(ClientWork)
    work.executor = ProcessExecutor(work.federation.config, work.federation.seed, worker="slow_worker:SlowWorker")
    exp.on_close(work.executor.close)
    return work.executor


@pytest.mark.slow  # worker processes timed out and killed: run by CI (`make test-slow`), not by `make test`
async def test_a_timed_out_process_job_is_killed_and_its_slot_comes_back_once_the_process_is_gone(
    tmp_path: Path, monkeypatch
) -> None:
    exp = experiment(tmp_path, "slow", parallel=1, **{"exp_opts.failure_policy": "tolerate",
                                                      "exp_opts.client_timeout_s": 5,
                                                      "exp_opts.online_clients": 10})
    victim = exp.config.clients.names[0]
    rec = EventRecorder(exp.bus)
    ran = {}
    executor = slow_process_executor(exp, tmp_path, monkeypatch, f"{victim}/2/sleep")
    real_stop = executor.stop

    def stop(slot):
        ran["process"] = executor._processes[(slot.device, slot.index)].process
        real_stop(slot)

    executor.stop = stop
    sampled = []
    exp.bus.subscribe(UploadsClosed, lambda ev: sampled.append(ev))
    await exp.run_async()
    failures = rec.of(ClientFailed)
    assert [(f.round, f.client, f.error_type) for f in failures] == [(2, victim, "ClientTimeout")]
    # killed, not waited for (it would have slept 30 s), and every later training ran on a fresh process
    assert ran["process"].exitcode == -signal.SIGKILL
    started_after = [e for e in rec.of(TrainStarted) if e.mono_time > failures[0].mono_time]
    assert len(started_after) == 10 * 3 - len([e for e in rec.of(TrainStarted) if e.mono_time < failures[0].mono_time])
    assert victim not in next(e for e in sampled if e.round == 2).clients
    assert json.loads(exp.paths.record.read_text())["status"] == "finished"


async def test_a_worker_process_that_dies_fails_its_client_and_the_next_job_gets_a_fresh_process(
    tmp_path: Path, monkeypatch
) -> None:
    exp = experiment(tmp_path, "dies", parallel=1, **{"exp_opts.failure_policy": "tolerate",
                                                      "exp_opts.online_clients": 10})
    victim = exp.config.clients.names[3]
    slow_process_executor(exp, tmp_path, monkeypatch, f"{victim}/1/die")
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    (failed,) = rec.of(ClientFailed)
    assert (failed.round, failed.client, failed.error_type) == (1, victim, "WorkerLost")
    assert failed.error.endswith("ended with exit code 3 before answering")
    trained = [(e.round, e.client) for e in rec.of(TrainDone)]
    assert len(trained) == 3 * 10 - 1 and (1, victim) not in trained and (2, victim) in trained
    assert json.loads(exp.paths.record.read_text())["status"] == "finished"
