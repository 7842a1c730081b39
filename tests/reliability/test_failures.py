"""Client failures under each policy, and clients that run past their time limit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedevents.engine import Aggregated, ClientDispatched, ClientFailed, ExperimentFailed, RunFailed, TrainDone, TrainStarted, UploadsClosed
from fedevents.cli import build_experiment
from fedevents.engine.testing import EventRecorder
from fedevents.handlers import ClientWork

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


def experiment(tmp_path: Path, **sets):
    overrides = {"exp_opts.comm_rounds": 3, "exp_opts.val_interval": 3, "exp_opts.online_clients": 5,
                 "task_opts.synthetic.samples_per_client": 48, "task_opts.synthetic.test_size": 24,
                 "logs_dir": str(tmp_path / "logs"), "checkpoints_dir": str(tmp_path / "ckpts"), **sets}
    return build_experiment(ROOT / "configs/demo.yaml", overrides=[f"{k}={v}" for k, v in overrides.items()],
                            console=None)


def inject(exp, failing: set[tuple[int, str]]) -> None:
    """A work handler that runs first and raises for the chosen (round, client) pairs."""

    async def explode(ev: ClientDispatched) -> None:
        if (ev.round, ev.client) in failing:
            raise RuntimeError(f"injected failure of {ev.client}")

    exp.bus.subscribe(ClientDispatched, explode, work=True, priority=10)


def sampled(exp, rnd: int) -> tuple[str, ...]:
    import random

    from fedevents.engine.runner import sample_seed

    names = exp.config.clients.names
    return tuple(names[i] for i in sorted(random.Random(sample_seed(exp.config.seed, rnd)).sample(range(10), 5)))


async def test_tolerate_leaves_failed_clients_out_and_goes_on(tmp_path: Path) -> None:
    exp = experiment(tmp_path, **{"exp_opts.failure_policy": "tolerate"})
    victims = {(2, sampled(exp, 2)[1]), (3, sampled(exp, 3)[0])}
    inject(exp, victims)
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    assert {(e.round, e.client) for e in rec.of(ClientFailed)} == victims
    for ev in rec.of(UploadsClosed):
        expected = tuple(c for c in sampled(exp, ev.round) if (ev.round, c) not in victims)
        assert ev.clients == expected
        assert next(a for a in rec.of(Aggregated) if a.round == ev.round).clients == tuple(sorted(expected))
    record = json.loads(exp.paths.record.read_text())
    assert record["status"] == "finished"
    assert sorted((f["round"], f["client"]) for f in record["failures"]) == sorted(victims)
    for rnd, client in victims:
        assert "tr_acc" not in record["data"].get(client, {}).get(str(rnd), {}).get("synth", {})


async def test_tolerate_stops_when_fewer_than_min_clients_succeed(tmp_path: Path) -> None:
    exp = experiment(tmp_path, **{"exp_opts.failure_policy": "tolerate", "exp_opts.min_clients": 3})
    inject(exp, {(2, c) for c in sampled(exp, 2)[:3]})
    rec = EventRecorder(exp.bus)
    with pytest.raises(RunFailed, match=r"^round 2: 2 of 5 clients trained, fewer than exp_opts.min_clients = 3$"):
        await exp.run_async()
    assert len(rec.of(ClientFailed)) == 3
    assert isinstance(rec.events[-1], ExperimentFailed)
    assert json.loads(exp.paths.record.read_text())["status"] == "failed"


async def test_fail_policy_stops_at_the_first_failure(tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    victim = sampled(exp, 2)[2]
    inject(exp, {(2, victim)})
    with pytest.raises(RunFailed, match=f"client {victim} failed in round 2 while training: RuntimeError"):
        await exp.run_async()
    assert json.loads(exp.paths.record.read_text())["error"].startswith(f"client {victim} failed in round 2")


async def test_a_client_past_its_time_limit_fails_and_keeps_its_slot_until_its_thread_ends(tmp_path: Path) -> None:
    exp = experiment(tmp_path, parallel=1, **{"exp_opts.failure_policy": "tolerate",
                                              "exp_opts.client_timeout_s": 0.5})
    slow = sampled(exp, 2)[0]
    work = exp.component(ClientWork)
    federation, executor = work.federation, work.executor
    real_train, ended = executor.train, {}

    def train(job, slot):
        result = real_train(job, slot)
        if job.client == slow and job.round == 2:
            time.sleep(1.5)
            ended["at"] = time.monotonic()
        return result

    executor.train = train
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    (failed,) = rec.of(ClientFailed)
    assert (failed.round, failed.client, failed.error_type) == (2, slow, "ClientTimeout")
    assert failed.error == (f"training {slow} took longer than exp_opts.client_timeout_s = 0.5s; "
                            "its result is discarded")
    # the only slot stayed taken until the late thread ended: no training started on it meanwhile
    started_after = [e for e in rec.of(TrainStarted) if e.mono_time > failed.mono_time]
    assert started_after and all(e.mono_time >= ended["at"] for e in started_after)
    # the late result was never stored: the client counts only the trainings that finished in time
    finished_in_time = [e for e in rec.of(TrainDone) if e.client == slow]
    stored = federation.store.get(slow)
    assert (stored.rounds_trained if stored else 0) == len(finished_in_time)
    assert slow not in next(e for e in rec.of(UploadsClosed) if e.round == 2).clients
