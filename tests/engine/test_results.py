"""Experiment.run() gives the run's result: status, record path, per-round means of every metric."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from fedevents.cli import build_experiment
from fedevents.engine import RunResult, TrainDone
from fedevents.engine.testing import EventRecorder

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_returns_status_record_and_the_mean_metrics_of_every_round(tmp_path: Path, backend: str) -> None:
    sets = {"exp_opts.comm_rounds": 3, "exp_opts.val_interval": 2, "exp_opts.val_model": "both",
            "task_opts.synthetic.samples_per_client": 48, "task_opts.synthetic.test_size": 24,
            "logs_dir": str(tmp_path / "logs"), "checkpoints_dir": str(tmp_path / "ckpts")}
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=[f"{k}={v}" for k, v in sets.items()], console=None)
    rec = EventRecorder(exp.bus)
    result = exp.run(backend=backend, handle_signals=False)
    assert isinstance(result, RunResult)
    assert (result.run_id, result.status, result.record, result.stopped) == (exp.paths.run_id, "finished",
                                                                              exp.paths.record, "")
    assert sorted(result.rounds) == [0, 1, 2, 3]
    record = json.loads(result.record.read_text())
    assert result.final.global_val == record["global"]["3"]["synth"]
    last = [e.metrics["tr_acc"] for e in rec.of(TrainDone) if e.round == 3]
    assert result.final.train["tr_acc"] == pytest.approx(sum(last) / len(last), abs=1e-12)
    vals = [m["val_acc"] for c in record["data"].values() for m in c["2"].values()]
    assert result.rounds[2].val["val_acc"] == pytest.approx(sum(vals) / len(vals), abs=1e-12)
    assert result.rounds[1].val == {} and result.last("val", "val_acc") == result.final.val["val_acc"]
    assert result.last("global_val", "nothing") is None
