"""Whole experiments in-process on both backends: dry run equals real run, handlers, many clients."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedevents.engine import TrainDone, TrainStarted
from fedevents.cli import build_experiment
from fedevents.engine.testing import EventRecorder
from fedevents.handlers import ClientWork

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


def small(tmp_path: Path, **extra) -> list[str]:
    sets = {"exp_opts.comm_rounds": 3, "exp_opts.val_interval": 2, "task_opts.synthetic.samples_per_client": 48,
            "task_opts.synthetic.test_size": 24, "logs_dir": str(tmp_path / "logs"), **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def shape(events) -> list:
    """The event sequence a dry run must reproduce: phases in order, each phase a multiset of ids."""
    phases, current = [], Counter()
    boundary = {"ExperimentStarted", "RoundStarted", "ClientsSampled", "UploadsClosed", "Aggregated",
                "RoundFinished", "ExperimentFinished"}
    for e in events:
        name = type(e).__name__
        ids = (name, getattr(e, "round", None), getattr(e, "client", None), getattr(e, "task", None),
               getattr(e, "clients", None))
        if name in boundary:
            if current:
                phases.append(current)
                current = Counter()
            phases.append(ids)
        else:
            current[ids] += 1
    return phases


async def test_dry_run_emits_the_same_event_sequence_as_a_real_run(tmp_path: Path) -> None:
    runs = {}
    for dry in (False, True):
        exp = build_experiment(ROOT / "configs/demo.yaml", overrides=small(tmp_path / str(dry)), dry_run=dry,
                               console=None)
        rec = EventRecorder(exp.bus)
        await exp.run_async()
        runs[dry] = rec.events
    assert shape(runs[True]) == shape(runs[False])
    assert len(runs[True]) == len(runs[False])
    assert all(e.metrics == {} for e in runs[True] if isinstance(e, TrainDone))
    assert all(0.0 <= e.metrics["tr_acc"] <= 1.0 for e in runs[False] if isinstance(e, TrainDone))


async def test_python_subscription_sees_each_training_with_device_and_timings(tmp_path: Path) -> None:
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=small(tmp_path), console=None)
    seen: list[TrainDone] = []
    exp.bus.subscribe(TrainDone, seen.append)
    await exp.run_async()
    assert len(seen) == 3 * 5
    for ev in seen:
        assert ev.device == "cpu" and ev.slot in (0, 1)
        assert ev.ran_s > 0 and ev.waited_s >= 0 and ev.samples == 48
        assert set(ev.metrics) == {"tr_acc", "tr_loss"}


async def test_yaml_handler_example_runs_and_writes_its_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = build_experiment(ROOT / "docs/examples/with_handler.yaml", console=None)
    await exp.run_async()
    best = json.loads((tmp_path / "logs/best_round.json").read_text())
    assert set(best["per_round"]) == {"0", "2", "4"}
    assert best["val_acc"] == max(best["per_round"].values())
    assert best["round"] in (2, 4)


async def test_training_threads_log_with_round_client_and_task_bound(tmp_path: Path) -> None:
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=small(tmp_path), console=None)
    await exp.run_async()
    lines = [json.loads(l) for l in exp.paths.log.read_text().splitlines()]
    epochs = [l for l in lines if l.get("event") == "epoch finished"]
    assert epochs, "training threads logged nothing"
    assert all({"round", "client", "task"} <= l.keys() for l in epochs)
    dispatched = {(l["round"], l["client"]) for l in epochs}
    assert len(dispatched) == 3 * 5


async def test_thousand_clients_cost_model_memory_only_once_sampled(tmp_path: Path) -> None:
    exp = build_experiment(ROOT / "configs/demo.yaml", console=None, overrides=small(
        tmp_path, clients="{count: 1000, tasks: [synth]}", **{"exp_opts.online_clients": 4,
                                                               "exp_opts.val_clients": "online"}))
    await exp.run_async()
    store = exp.component(ClientWork).federation.store
    assert 1 <= len(store) <= 12  # only the sampled clients hold state
    assert len(exp.config.clients) == 1000


async def test_parallel_trainings_never_exceed_slots(tmp_path: Path) -> None:
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=small(tmp_path, parallel=2), console=None)
    running, peak = set(), []

    def track(ev) -> None:
        key = (ev.device, ev.slot)
        if isinstance(ev, TrainStarted):
            assert key not in running
            running.add(key)
            peak.append(len(running))
        else:
            running.discard(key)

    exp.bus.subscribe((TrainStarted, TrainDone), track)
    await exp.run_async()
    assert max(peak) == 2


async def test_runs_of_one_experiment_started_together_never_share_files(tmp_path: Path) -> None:
    exps = [build_experiment(ROOT / "configs/demo.yaml", overrides=small(tmp_path), console=None) for _ in range(20)]
    assert len({e.paths.run_id for e in exps}) == 20  # built within the same second
    stems = {e.paths.record.name.removesuffix(".json") for e in exps}
    assert len(stems) == 20 and all(s.startswith("demo-") for s in stems)
