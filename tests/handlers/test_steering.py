"""Handlers that steer: end a run after a round (status stopped, exit 0), early stopping, the best model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedevents.cli import build_experiment
from fedevents.engine import ExperimentFinished, RoundStarted
from fedevents.engine.testing import EventRecorder
from fedevents.handlers.steering import BestModel, EarlyStopping, RunControl

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


def overrides(tmp_path: Path, **extra) -> list[str]:
    sets = {"exp_opts.comm_rounds": 6, "exp_opts.val_interval": 1, "exp_opts.val_model": "global",
            "task_opts.synthetic.samples_per_client": 48, "task_opts.synthetic.test_size": 24,
            "task_opts.synthetic.global_test_size": 60, "logs_dir": str(tmp_path / "logs"),
            "checkpoints_dir": str(tmp_path / "ckpts"), **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def test_early_stopping_from_yaml_ends_the_run_as_stopped_with_exit_0_and_keeps_the_best_model(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    data["handlers"] = [{"target": "fedevents.handlers.steering:EarlyStopping",
                         "kwargs": {"metric": "val_acc", "patience": 2, "min_delta": 0.9}},
                        {"target": "fedevents.handlers.steering:BestModel",
                         "kwargs": {"path": str(tmp_path / "best.pt"), "metric": "val_acc"}}]
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "fedevents.cli", "run", str(tmp_path / "exp.yaml"),
                          *[a for o in overrides(tmp_path) for a in ("--set", o)]],
                         cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    record = json.loads(next(p for p in (tmp_path / "logs").glob("*.json") if ".trace" not in p.name).read_text())
    # round 0 sets the best; rounds 1 and 2 do not beat it by 0.9: the run ends after round 2
    assert record["status"] == "stopped" and record["last_round"] == 2 and record["rounds"] == 2
    assert record["stopped"].startswith("early stopping: val_acc did not improve on ")
    assert record["stopped"].endswith("(round 0) for 2 validation rounds")
    assert list(record["global"]) == ["0", "1", "2"]
    assert "experiment demo stopped after 2 rounds (early stopping" in run.stderr
    # The best model, kept by the second handler, is the global model of the best of the rounds run.
    scores = {int(r): tasks["synth"]["val_acc"] for r, tasks in record["global"].items()}
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["metric"] == "val_acc" and best["value"] == max(scores.values())
    assert best["round"] == min(r for r, v in scores.items() if v == best["value"])
    assert sorted(p.name for p in next((tmp_path / "ckpts").iterdir()).glob("round-*.pt"))[-1] == "round-000002.pt"


async def test_best_model_keeps_the_global_model_of_the_best_scored_round(tmp_path: Path) -> None:
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=overrides(tmp_path), console=None)
    best = exp.add(BestModel(str(tmp_path / "best.pt"), metric="val_acc"))
    await exp.run_async()
    record = json.loads(exp.paths.record.read_text())
    scores = {int(r): tasks["synth"]["val_acc"] for r, tasks in record["global"].items()}
    top = max(scores.values())
    first_best = min(r for r, v in scores.items() if v == top)
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert (saved["round"], saved["metric"], saved["value"]) == (first_best, "val_acc", top)
    assert best.saved[-1] == first_best and best.saved == sorted(best.saved) and best.saved[0] == 0
    if first_best == 6:  # the best is the last round: the saved model is the final global model
        final = exp.control.global_model()
        assert all(torch.equal(saved["model"][k], final[k]) for k in final)


async def test_a_handler_can_end_a_run_from_python_and_read_the_global_model(tmp_path: Path) -> None:
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=overrides(tmp_path), console=None)
    seen = {}

    class StopAtThree:
        def bind(self, control: RunControl) -> None:
            self.control = control

        def subscribe(self, bus):
            return [bus.subscribe(RoundStarted, self.started)]

        def started(self, ev: RoundStarted) -> None:
            if ev.round == 3:
                seen["model"] = self.control.global_model()
                self.control.finish_after_round("enough")

    exp.add(StopAtThree())
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    (finished,) = rec.of(ExperimentFinished)
    assert (finished.rounds, finished.stopped) == (3, "enough")
    assert [e.round for e in rec.of(RoundStarted)] == [0, 1, 2, 3]
    assert set(seen["model"]) == set(exp.control.global_model())


async def test_a_dry_run_has_no_model_to_read_and_a_stop_needs_a_running_experiment(tmp_path: Path) -> None:
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=overrides(tmp_path), dry_run=True, console=None)
    with pytest.raises(RuntimeError, match="expected a run that trains, found a dry run"):
        exp.control.global_model()
    with pytest.raises(RuntimeError, match="finish_after_round: expected a running experiment"):
        exp.control.finish_after_round("now")


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="patience: expected an int >= 1, found 0"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="mode: expected 'max' or 'min', found 'up'"):
        EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="scope: expected 'global' or 'local', found 'all'"):
        BestModel("x.pt", scope="all")
