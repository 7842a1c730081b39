"""exp_opts.val_model: the aggregated model scored on the server's test set, recorded under ``global``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from fedevents.cli import build_experiment
from fedevents.engine import GlobalValDone, GlobalValScheduled, ValDone
from fedevents.engine.testing import EventRecorder
from fedevents.handlers import ClientWork

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


def experiment(tmp_path: Path, val_model: str, *, dry_run: bool = False, console=None):
    sets = {"exp_opts.comm_rounds": 3, "exp_opts.val_interval": 2, "exp_opts.val_model": val_model,
            "task_opts.synthetic.samples_per_client": 48, "task_opts.synthetic.test_size": 24,
            "task_opts.synthetic.global_test_size": 50, "logs_dir": str(tmp_path / "logs"),
            "checkpoints_dir": str(tmp_path / "ckpts")}
    return build_experiment(ROOT / "configs/demo.yaml", overrides=[f"{k}={v}" for k, v in sets.items()],
                            dry_run=dry_run, console=console)


async def test_global_scores_the_aggregated_model_after_each_validation_round(tmp_path: Path) -> None:
    exp = experiment(tmp_path, "global")
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    record = json.loads(exp.paths.record.read_text())
    # rounds 0, 2 (val_interval) and 3 (the last); one task, "synth", scored on 50 balanced samples
    assert list(record["global"]) == ["0", "2", "3"]
    assert all(list(tasks) == ["synth"] for tasks in record["global"].values())
    assert {e.samples for e in rec.of(GlobalValDone)} == {50}
    # clients are not scored: the FedSTIL `data` section holds only training metrics
    assert not rec.of(ValDone)
    assert all(set(m) == {"tr_acc", "tr_loss"} for c in record["data"].values() for r in c.values() for m in r.values())
    # the last score is the final global model's, scored again here on the same test set
    work = exp.component(ClientWork)
    job = work.federation.global_val_job(tasks=("synth",), round=3, device="cpu")
    again = work.federation.worker.validate(job)["synth"].metrics
    assert record["global"]["3"]["synth"] == again
    # round 0 scores the initial model, which has not learnt anything yet
    assert record["global"]["0"]["synth"]["val_acc"] < record["global"]["3"]["synth"]["val_acc"]


async def test_both_keeps_the_clients_scores_and_adds_the_global_one_and_the_console_names_each(tmp_path: Path) -> None:
    console = io.StringIO()
    exp = experiment(tmp_path, "both", console=console)
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    record = json.loads(exp.paths.record.read_text())
    assert list(record["global"]) == ["0", "2", "3"]
    assert {e.round for e in rec.of(ValDone)} == {0, 2, 3}
    last = [line for line in console.getvalue().splitlines() if "round 3/3" in line][0]
    assert "local val_acc " in last and "global val_acc " in last
    # the global score comes after aggregation in the round
    names = [type(e).__name__ for e in rec.events if getattr(e, "round", None) == 2]
    assert names.index("Aggregated") < names.index("GlobalValScheduled") < names.index("GlobalValDone")


async def test_the_dry_run_emits_the_global_validation_too(tmp_path: Path) -> None:
    kinds = {}
    for dry in (False, True):
        exp = experiment(tmp_path / str(dry), "both", dry_run=dry)
        rec = EventRecorder(exp.bus)
        await exp.run_async()
        kinds[dry] = [(type(e).__name__, getattr(e, "round", None), getattr(e, "task", None))
                      for e in rec.events if isinstance(e, (GlobalValScheduled, GlobalValDone))]
    assert kinds[True] == kinds[False] and len(kinds[True]) == 6
