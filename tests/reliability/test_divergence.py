"""Diverging training: strict JSON in every file, a non-finite client is a client failure, never aggregated."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from fedevents.cli import build_experiment
from fedevents.engine import ClientFailed, UploadsClosed
from fedevents.engine.testing import EventRecorder
from fedevents.handlers import ClientWork

from .conftest import experiment, fedevents, record

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


def strict(text: str) -> object:
    """Parse ``text`` as strict JSON: a bare NaN or Infinity token fails, as in JavaScript's JSON.parse."""

    def refuse(token: str) -> None:
        raise ValueError(f"bare {token} in JSON")

    return json.loads(text, parse_constant=refuse)


def every_file_is_strict_json(logs: Path) -> str:
    """Parse every file fedevents wrote in ``logs``; give all their text, to look for what they hold."""
    texts = []
    for path in sorted(logs.iterdir()):
        text = path.read_text()
        texts.append(text)
        if path.name.endswith(".jsonl"):
            for line in text.splitlines():
                strict(line)
        else:
            strict(text)
    return "\n".join(texts)


def build(tmp_path: Path, **sets):
    overrides = {"exp_opts.comm_rounds": 2, "exp_opts.val_interval": 1, "exp_opts.online_clients": 4,
                 "task_opts.synthetic.samples_per_client": 48, "task_opts.synthetic.test_size": 24,
                 "logs_dir": str(tmp_path / "logs"), "checkpoints_dir": str(tmp_path / "ckpts"), **sets}
    return build_experiment(ROOT / "configs/demo.yaml", overrides=[f"{k}={v}" for k, v in overrides.items()],
                            console=None)


def test_a_diverging_run_fails_in_one_line_and_writes_strict_json(tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    run = fedevents("run", str(exp), "--set", "optimizer_opts.lr=1000000.0", cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    [line] = [line for line in run.stderr.splitlines() if line.startswith("fedevents:")]
    assert line.startswith("fedevents: error: client ") and " failed in round 1 while training: ClientDiverged: " in line
    assert "Traceback" not in run.stderr
    every_file_is_strict_json(tmp_path / "logs")
    rec = record(tmp_path)
    assert rec["status"] == "failed" and "ClientDiverged" in rec["error"]
    assert rec["failures"][0]["error"].startswith("ClientDiverged: ")
    assert "1" not in {r for rounds in rec["data"].values() for r in rounds}  # no metric of a diverged round


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_non_finite_learning_rate_is_refused(tmp_path: Path, value: str) -> None:
    exp = experiment(tmp_path)
    run = fedevents("run", str(exp), "--set", f"optimizer_opts.lr={value}", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith("fedevents: error: --set optimizer_opts.lr: optimizer_opts.lr: expected a finite number")
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


async def test_a_diverged_client_is_left_out_and_the_aggregate_stays_finite(tmp_path: Path) -> None:
    exp = build(tmp_path, **{"exp_opts.failure_policy": "tolerate", "exp_opts.online_clients": 10})
    federation = exp.component(ClientWork).federation
    real_train = federation.worker.train
    victim = exp.config.clients.names[3]

    def train(job):
        outcome = real_train(job)
        if job.client == victim:  # one weight turns NaN, as an exploding step would leave it
            model = dict(outcome.state.model)
            name = next(n for n, t in model.items() if t.is_floating_point())
            model[name] = torch.full_like(model[name], math.nan)
            outcome = dataclasses.replace(outcome, state=dataclasses.replace(outcome.state, model=model))
        return outcome

    federation.worker.train = train
    rec = EventRecorder(exp.bus)
    await exp.run_async()
    failed = rec.of(ClientFailed)
    assert {(e.client, e.error_type) for e in failed} == {(victim, "ClientDiverged")}
    assert all(victim not in e.clients for e in rec.of(UploadsClosed))
    assert all(bool(torch.isfinite(t).all()) for t in federation.server_state().values() if t.is_floating_point())
    saved = json.loads(exp.paths.record.read_text())
    assert saved["status"] == "finished"
    assert {f["client"] for f in saved["failures"]} == {victim}
    assert all(f["error"].startswith(f"ClientDiverged: {victim} diverged: weight ") for f in saved["failures"])


async def test_non_finite_metrics_are_written_as_strings_in_every_file(tmp_path: Path) -> None:
    exp = build(tmp_path)
    federation = exp.component(ClientWork).federation
    real_validate = federation.worker.validate

    def validate(job):
        results = real_validate(job)
        return {task: dataclasses.replace(res, metrics={**res.metrics, "val_loss": math.inf, "odd": math.nan})
                for task, res in results.items()}

    federation.worker.validate = validate
    await exp.run_async()
    text = every_file_is_strict_json(tmp_path / "logs")
    assert '"val_loss":"Infinity"' in text.replace(" ", "") and '"odd":"NaN"' in text.replace(" ", "")
    saved = json.loads(exp.paths.record.read_text())
    assert saved["status"] == "finished"
    first = next(iter(saved["data"].values()))
    assert next(iter(first["0"].values()))["val_loss"] == "Infinity"
