"""The run loop's choreography, with torch-free work handlers standing in for training."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import yaml

from fedevents.engine import (
    Aggregated, ClientDispatched, ClientFailed, ClientsSampled, ExperimentFailed, ExperimentFinished,
    Experiment, RunFailed, TrainDone, UploadsClosed, ValDone, ValScheduled, load_experiment,
)
from fedevents.engine.runner import sample_seed, task_index
from fedevents.engine.testing import EventRecorder

pytestmark = pytest.mark.anyio


class FakeWork:
    """Answers work events immediately; ``fail`` names (round, client) pairs whose training raises."""

    def __init__(self, exp: Experiment, fail: set[tuple[int, str]] = frozenset()) -> None:
        self.exp, self.fail, self.concurrent, self.peak = exp, fail, 0, 0

    def subscribe(self, bus):
        return [bus.subscribe(ClientDispatched, self.train, work=True),
                bus.subscribe(ValScheduled, self.validate, work=True),
                bus.subscribe(UploadsClosed, self.aggregate, work=True)]

    async def train(self, ev: ClientDispatched) -> None:
        if (ev.round, ev.client) in self.fail:
            raise RuntimeError(f"boom {ev.client}")
        async with self.exp.pool.slot() as slot:
            self.concurrent += 1
            self.peak = max(self.peak, self.concurrent)
            await anyio.sleep(0.001)
            self.concurrent -= 1
            await self.exp.bus.emit(self.exp.context.make(
                TrainDone, round=ev.round, client=ev.client, task=ev.task, device=slot.device, slot=slot.index,
                waited_s=slot.waited_s, ran_s=0.0, samples=1, metrics={"tr_acc": 1.0}))

    async def validate(self, ev: ValScheduled) -> None:
        for task in ev.tasks:
            await self.exp.bus.emit(self.exp.context.make(
                ValDone, round=ev.round, client=ev.client, task=task, device="cpu", slot=0, ran_s=0.0,
                samples=1, metrics={"val_acc": 0.5}))

    async def aggregate(self, ev: UploadsClosed) -> None:
        await self.exp.bus.emit(self.exp.context.make(Aggregated, round=ev.round, clients=ev.clients,
                                                      samples=len(ev.clients), ran_s=0.0))


def experiment(tmp_path: Path, **changes) -> Experiment:
    data = {"exp_name": "t", "exp_method": "fedavg", "logs_dir": str(tmp_path / "logs"), "parallel": 2,
            "exp_opts": {"comm_rounds": 4, "val_interval": 2, "online_clients": 3},
            "task_opts": {"sustain_rounds": 2},
            "clients": [{"client_name": f"c{i}", "tasks": ["t0", "t1"]} for i in range(6)]}
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data[section] = {**data.get(section, {}), leaf: value}
        else:
            data[key] = value
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return Experiment(load_experiment(path))


async def test_rounds_follow_the_documented_choreography(tmp_path: Path) -> None:
    exp = experiment(tmp_path, exp_opts__val_reuse=False)
    exp.add(FakeWork(exp))
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    types = rec.types()
    assert types[0] == "ExperimentStarted" and types[-1] == "ExperimentFinished"
    # round 0 validates all 6 clients on both tasks, then rounds 1..4; validation in rounds 2 and 4
    assert [e.round for e in rec.of(ValScheduled)] == [0] * 6 + [2] * 6 + [4] * 6
    assert len(rec.of(ValDone)) == 3 * 6 * 2
    for rnd in range(1, 5):
        in_round = [type(e).__name__ for e in rec.events if getattr(e, "round", None) == rnd]
        assert in_round[:2] == ["RoundStarted", "ClientsSampled"]
        assert in_round[-2:] == ["Aggregated", "RoundFinished"]
        assert in_round.count("ClientDispatched") == 3
    assert [e.seq for e in rec.events] == list(range(1, len(rec) + 1))


async def test_with_kept_scores_each_validation_round_covers_every_client_once(tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    exp.add(FakeWork(exp))
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    sent = {e.round: set(e.clients) for e in rec.of(ClientsSampled)}
    for rnd in (0, 2, 4):
        scored = [e.client for e in rec.of(ValScheduled) if e.round == rnd]
        kept = [c for e in rec.events if type(e).__name__ == "ValReused" and e.round == rnd for c in e.clients]
        assert sorted(scored + kept) == [f"c{i}" for i in range(6)]
        assert not set(kept) & (sent.get(rnd - 1, set()) | sent.get(rnd, set()))  # trained since: scored
    finished = {e.round: (e.validated, e.reused) for e in rec.events if type(e).__name__ == "RoundFinished"}
    assert all(finished[r][0] == 6 for r in (0, 2, 4)) and finished[0][1] == 0


async def test_sampling_is_seeded_and_recorded(tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    exp.add(FakeWork(exp))
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    sampled = rec.of(ClientsSampled)
    import random
    for ev in sampled:
        assert ev.sample_seed == sample_seed(0, ev.round)
        idx = sorted(random.Random(ev.sample_seed).sample(range(6), 3))
        assert ev.clients == tuple(f"c{i}" for i in idx)
    assert sample_seed(0, 1) == sample_seed(0, 1) != sample_seed(0, 2) != sample_seed(1, 2)


async def test_new_clients_get_integrated_state_and_known_ones_incremental(tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    exp.add(FakeWork(exp))
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    seen: dict[str, int] = {}
    for ev in rec.of(ClientDispatched):
        expected_state = "incremental" if ev.client in seen else "integrated"
        assert ev.state == expected_state
        # sustain_rounds 2: two participations on t0, then t1 for good
        assert ev.task == ("t0", "t1")[task_index(seen.get(ev.client, 0), 2, 2)]
        seen[ev.client] = seen.get(ev.client, 0) + 1


def test_task_stream_advances_after_sustain_rounds_and_stays_on_the_last() -> None:
    assert [task_index(p, 2, 3) for p in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert [task_index(p, 1, 1) for p in range(3)] == [0, 0, 0]


async def test_aggregation_gets_exactly_this_rounds_trained_clients(tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    exp.add(FakeWork(exp))
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    for closed, sampled in zip(rec.of(UploadsClosed), rec.of(ClientsSampled)):
        assert closed.round == sampled.round
        assert closed.clients == sampled.clients  # sampled order, whatever order they finished in


async def test_concurrency_never_exceeds_the_pool(tmp_path: Path) -> None:
    exp = experiment(tmp_path, parallel=2, exp_opts__online_clients=6)
    work = exp.add(FakeWork(exp))
    await exp.run_async()
    assert work.peak == 2


async def test_failing_client_emits_client_failed_then_experiment_failed(tmp_path: Path) -> None:
    exp = experiment(tmp_path, exp_opts__online_clients=6)
    exp.add(FakeWork(exp, fail={(2, "c3")}))
    rec = EventRecorder(exp.bus)
    with pytest.raises(RunFailed, match="client c3 failed in round 2 while training: RuntimeError: boom c3"):
        await exp.run_async()
    failed = rec.of(ClientFailed)
    assert [(f.round, f.client, f.phase, f.error) for f in failed] == [(2, "c3", "train", "boom c3")]
    assert "RuntimeError: boom c3" in failed[0].traceback
    final = rec.events[-1]
    assert isinstance(final, ExperimentFailed) and final.round == 2
    assert "client c3 failed" in final.reason
    assert not rec.of(ExperimentFinished)
    assert all(e.round < 2 for e in rec.of(UploadsClosed))


async def test_missing_work_handler_is_refused_before_any_event(tmp_path: Path) -> None:
    from fedevents.engine import ConfigError

    exp = experiment(tmp_path)
    rec = EventRecorder(exp.bus)
    with pytest.raises(ConfigError, match="no work handler is subscribed to ClientDispatched"):
        await exp.run_async()
    assert len(rec) == 0


async def test_online_validation_scope_skips_round_zero(tmp_path: Path) -> None:
    exp = experiment(tmp_path, exp_opts__val_clients="online")
    exp.add(FakeWork(exp))
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    assert {e.round for e in rec.of(ValScheduled)} == {2, 4}
    for rnd in (2, 4):
        vals = sorted(e.client for e in rec.of(ValScheduled) if e.round == rnd)
        trained = sorted(next(e for e in rec.of(ClientsSampled) if e.round == rnd).clients)
        assert vals == trained
