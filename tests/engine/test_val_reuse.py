"""Validation that keeps the scores of clients whose stored state has not changed (exp_opts.val_reuse)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedevents.cli import build_experiment
from fedevents.engine import ClientDispatched, ClientsSampled, RoundFinished, ValDone, ValReused, ValScheduled
from fedevents.engine.reuse import ScoreLedger
from fedevents.engine.testing import EventRecorder
from fedevents.federated.methods import REGISTRY

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


def demo(tmp_path: Path, **extra) -> list[str]:
    """The demo (10 clients, 3 online) for 4 rounds, validated in rounds 0, 2 and 4."""
    sets = {"exp_opts.comm_rounds": 4, "exp_opts.val_interval": 2, "task_opts.synthetic.samples_per_client": 48,
            "task_opts.synthetic.test_size": 24, "task_opts.train_epochs": 1, "exp_opts.val_model": "local",
            "exp_opts.online_clients": 3, "logs_dir": str(tmp_path / "logs"),
            "checkpoints_dir": str(tmp_path / "ckpts"), **extra}
    return [f"{k}={v}" for k, v in sets.items()]


async def run(tmp_path: Path, *, dry_run: bool = False, **extra) -> tuple[list, dict]:
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=demo(tmp_path, **extra), dry_run=dry_run,
                           console=None)
    rec = EventRecorder(exp.bus)
    result = await exp.run_async()
    record = json.loads(exp.paths.record.read_text())
    record["means"] = {rnd: metrics.val for rnd, metrics in result.rounds.items()}  # RunResult's, per round
    return rec.events, record


async def test_kept_scores_equal_recomputed_ones(tmp_path: Path) -> None:
    kept_events, kept = await run(tmp_path / "kept")
    fresh_events, fresh = await run(tmp_path / "fresh", **{"exp_opts.val_reuse": "false"})
    assert kept["data"] == fresh["data"]
    # The same scores, summed in another order (kept ones first): equal up to rounding.
    assert kept["means"].keys() == fresh["means"].keys() and set(kept["means"][4]) == {"val_acc", "val_loss"}
    for rnd, means in fresh["means"].items():
        assert kept["means"][rnd] == pytest.approx(means, rel=1e-12, abs=0)
    assert sum(isinstance(e, ValReused) for e in fresh_events) == 0
    reused = [c for e in kept_events if isinstance(e, ValReused) for c in e.clients]
    assert reused, "nothing was reused: the test would prove nothing"
    scored = sum(isinstance(e, ValScheduled) for e in kept_events)
    assert scored + len(reused) == sum(isinstance(e, ValScheduled) for e in fresh_events) == 3 * 10
    finished = [e for e in kept_events if isinstance(e, RoundFinished)]
    assert [e.validated for e in finished] == [10, 0, 10, 0, 10]
    assert sum(e.reused for e in finished) == len(reused)


async def test_reused_clients_are_named_with_the_round_and_scores_they_keep(tmp_path: Path) -> None:
    events, record = await run(tmp_path)
    scores: dict[tuple[str, int], dict] = {}
    trained: dict[str, list[int]] = {}
    for e in events:
        if isinstance(e, ValDone):
            scores.setdefault((e.client, e.round), {})[e.task] = dict(e.metrics)
        elif isinstance(e, ClientDispatched):
            trained.setdefault(e.client, []).append(e.round)
    for e in (e for e in events if isinstance(e, ValReused)):
        assert list(e.clients) == sorted(e.clients)
        for client, kept_from, kept in zip(e.clients, e.scored_in, e.scores):
            assert kept_from < e.round
            assert {t: dict(m) for t, m in kept.items()} == scores[(client, kept_from)]
            # It has a model of its own, unchanged since it was scored.
            rounds = trained[client]
            assert min(rounds) <= kept_from and not [r for r in rounds if kept_from < r <= e.round]
            assert record["data"][client][str(e.round)] == scores[(client, kept_from)]


async def test_a_client_that_trained_or_never_trained_is_scored_again(tmp_path: Path) -> None:
    events, _ = await run(tmp_path)
    online = {e.round: set(e.clients) for e in events if isinstance(e, ClientsSampled)}
    for rnd in (2, 4):
        scheduled = {e.client for e in events if isinstance(e, ValScheduled) and e.round == rnd}
        reused = {c for e in events if isinstance(e, ValReused) and e.round == rnd for c in e.clients}
        assert len(scheduled | reused) == 10 and not scheduled & reused
        assert online[rnd] <= scheduled  # trained this round: a new state
        ever = set().union(*(online[r] for r in range(1, rnd + 1)))
        never = {c for c in scheduled | reused if c not in ever}
        assert never <= scheduled  # scored with the global model, which every aggregation changes


async def test_a_dry_run_keeps_the_scores_a_real_run_keeps(tmp_path: Path) -> None:
    real, _ = await run(tmp_path / "real")
    dry, record = await run(tmp_path / "dry", dry_run=True)
    names = [(e.round, e.clients, e.scored_in) for e in real if isinstance(e, ValReused)]
    assert names and names == [(e.round, e.clients, e.scored_in) for e in dry if isinstance(e, ValReused)]
    assert all(record["data"][c][str(r)] == {"synth": {}} for r, clients, _ in names for c in clients)


async def test_a_method_whose_scores_read_more_than_the_state_scores_every_client(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    monkeypatch.setattr(REGISTRY["fedavg"], "reusable_scores", False)
    events, _ = await run(tmp_path)
    assert not [e for e in events if isinstance(e, ValReused)]
    assert sum(isinstance(e, ValScheduled) for e in events) == 30


def test_the_ledger_keeps_scores_until_the_client_or_the_global_model_changes() -> None:
    ledger = ScoreLedger(enabled=True)
    for client in ("a", "b", "c"):
        ledger.score(client, "t", {"val_acc": 0.5})
        ledger.scored(client, 0)
    assert ledger.split(["a", "b", "c"]) == ([], ["a", "b", "c"])
    ledger.dispatched("a")
    ledger.trained("a")
    ledger.dispatched("b")  # its training failed: no state of its own, and maybe a changed one
    ledger.aggregated()
    assert ledger.split(["a", "b", "c"]) == (["a", "b", "c"], [])
    ledger.score("a", "t", {"val_acc": 0.75})
    ledger.scored("a", 1)
    ledger.failed("b")
    ledger.aggregated()
    assert ledger.split(["a", "b", "c"]) == (["b", "c"], ["a"])
    assert ledger.reused(["a"]) == ((1,), ({"t": {"val_acc": 0.75}},))
    copy = ScoreLedger()
    copy.load_state_dict(ledger.state_dict())  # what a checkpoint carries
    assert copy.split(["a", "b", "c"]) == (["b", "c"], ["a"]) and copy.reused(["a"]) == ledger.reused(["a"])
    copy.aggregated()
    assert copy.split(["a", "c"]) == (["c"], ["a"])
    off = ScoreLedger(enabled=False)
    off.score("a", "t", {"val_acc": 0.5})
    off.scored("a", 0)
    assert off.split(["a"]) == (["a"], [])


async def test_a_resumed_run_ends_with_the_uninterrupted_record(tmp_path: Path) -> None:
    six = {"exp_opts.comm_rounds": 6}  # validated in rounds 0, 2, 4 and 6; cut after round 2
    whole_events, whole = await run(tmp_path / "whole", **six)
    overrides = demo(tmp_path / "cut", **six)
    cut = build_experiment(ROOT / "configs/demo.yaml", overrides=overrides, console=None)
    cut.bus.subscribe(RoundFinished, lambda ev: cut.finish_after_round("cut") if ev.round == 2 else None)
    await cut.run_async()
    resumed = build_experiment(ROOT / "configs/demo.yaml", overrides=overrides, console=None, resume=True)
    rec = EventRecorder(resumed.bus)
    await resumed.run_async()
    record = json.loads(resumed.paths.record.read_text())
    assert record["status"] == "finished" and record["data"] == whole["data"]
    kept = [(e.round, e.clients, e.scored_in) for e in rec.events if isinstance(e, ValReused)]
    assert kept and kept == [(e.round, e.clients, e.scored_in) for e in whole_events
                             if isinstance(e, ValReused) and e.round > 2]  # the ledger came with the checkpoint


async def test_a_run_resumed_with_val_reuse_changed_ends_with_the_same_record(tmp_path: Path) -> None:
    _, whole = await run(tmp_path / "whole")
    cut = build_experiment(ROOT / "configs/demo.yaml", overrides=demo(tmp_path / "cut"), console=None)
    cut.bus.subscribe(RoundFinished, lambda ev: cut.finish_after_round("cut") if ev.round == 1 else None)
    await cut.run_async()
    resumed = build_experiment(ROOT / "configs/demo.yaml", overrides=demo(tmp_path / "cut", **{
        "exp_opts.val_reuse": "false"}), console=None, resume=True)
    await resumed.run_async()
    assert json.loads(resumed.paths.record.read_text())["data"] == whole["data"]
