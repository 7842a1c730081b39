"""TensorBoard and MLflow trackers against local stores, read back with each library's own reader."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from fedevents.cli import build_experiment
from fedevents.handlers.trackers import RoundScalars, flatten

ROOT = Path(__file__).resolve().parents[2]


def small(tmp_path: Path, rounds: int = 2) -> list[str]:
    return [f"logs_dir={tmp_path / 'logs'}", f"checkpoints_dir={tmp_path / 'ckpts'}", f"exp_opts.comm_rounds={rounds}",
            "exp_opts.val_interval=1", "task_opts.synthetic.samples_per_client=32", "task_opts.synthetic.test_size=16"]


def test_round_scalars_name_each_client_up_to_the_cap_and_always_the_means() -> None:
    scalars = RoundScalars(per_client=1)
    scalars.add_train("c0", {"tr_acc": 0.5, "flag": True})
    scalars.add_train("c1", {"tr_acc": 0.75})
    scalars.add_val("c0", {"val_acc": 0.25})
    scalars.add_val("c0", {"val_acc": 0.75})  # a second task
    scalars.add_global({"val_acc": 0.5})
    scalars.add_global({"val_acc": 1.0})  # the global model on a second task
    scalars.upload_bytes = 2048
    assert scalars.scalars(1.5) == {
        "train/tr_acc/c0": 0.5, "train/tr_acc/mean": 0.625,
        "val/val_acc/c0": 0.5, "val/val_acc/mean": 0.5, "global/val_acc": 0.75,
        "comm/upload_bytes": 2048.0, "time/round_s": 1.5,
    }
    assert scalars.scalars(2.0) == {"comm/upload_bytes": 0.0, "time/round_s": 2.0}  # emptied for the next round


def test_flatten_joins_keys_with_dots_and_keeps_lists_whole() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {}}) == {"a.b": 1, "a.c": "[1, 2]", "d": "x", "e": "{}"}


def test_tensorboard_gets_per_round_scalars_and_the_config(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = build_experiment(ROOT / "configs/demo.yaml", console=None, overrides=small(tmp_path),
                           tensorboard=str(tmp_path / "tb"))
    exp.run()
    (run_dir,) = (tmp_path / "tb").iterdir()
    assert run_dir.name == exp.paths.run_id
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/tr_acc/mean", "train/tr_loss/mean", "val/val_acc/mean", "comm/upload_bytes",
            "time/round_s"} <= tags
    assert {t.split("/")[2] for t in tags if t.startswith("train/tr_acc/") and t != "train/tr_acc/mean"} <= {
        f"client-{i}" for i in range(10)}
    assert [s.step for s in events.Scalars("train/tr_acc/mean")] == [1, 2]
    assert [s.step for s in events.Scalars("val/val_acc/mean")] == [0, 1, 2]
    # the demo scores the global model too (val_model: both)
    assert [s.step for s in events.Scalars("global/val_acc")] == [0, 1, 2]
    record = json.loads(exp.paths.record.read_text())
    uploads = record["comm"]["upload_bytes"]
    assert sum(s.value for s in events.Scalars("comm/upload_bytes")) == uploads
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"exp_name": "demo"' in text


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch) -> str:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a folder store, for the test; users may use sqlite
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_gets_metrics_params_artifacts_and_the_final_status(tmp_path: Path, mlflow_store: str) -> None:
    from mlflow.tracking import MlflowClient

    exp = build_experiment(ROOT / "configs/demo.yaml", console=None, overrides=small(tmp_path), mlflow=mlflow_store)
    exp.run()
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == exp.paths.run_id
    assert run.data.params["exp_name"] == "demo" and run.data.params["exp_opts.comm_rounds"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/tr_acc/mean")] == [1, 2]
    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert artifacts == sorted([exp.paths.record.name, exp.paths.trace.name])


@pytest.mark.slow  # a killed run resumed against MLflow's store: run by CI (`make test-slow`), not by `make test`
def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path: Path, mlflow_store: str) -> None:
    from mlflow.tracking import MlflowClient

    from tests.reliability.conftest import experiment, fedevents

    exp = experiment(tmp_path)
    kill = {"target": "killer:Killer", "kwargs": {"at": "TrainStarted", "round": 4, "nth": 1}}
    env_flag = ["--mlflow", mlflow_store]
    killed = fedevents("run", str(exp), *env_flag, "--set", f"handlers=[{json.dumps(kill)}]", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = fedevents("run", str(exp), "--resume", *env_flag, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "time/round_s")})
    assert steps == list(range(0, 8))  # every round of the 7, from both processes, in one tracker run
