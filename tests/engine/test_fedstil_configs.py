"""FedSTIL-format ReID experiments run as users have them: common file + experiment file, every method."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from fedevents.cli import build_experiments
from fedevents.engine import TrainDone, ValDone
from fedevents.federated import METHODS
from fedevents.federated.synth_reid import generate_synth_reid

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The classic 5 clients x 6 tasks layout, small: 4 identities per task, 4 images each."""
    out = tmp_path_factory.mktemp("reid-5x6")
    generate_synth_reid(out, clients=5, tasks=6, ids_per_task=4, images_per_id=4, cameras=2, img_size=(64, 32))
    return out


def run(data: Path, tmp_path: Path, *sets: str):
    (exp,) = build_experiments(
        [ROOT / "configs/reid/fedprox.yaml"], common=ROOT / "configs/reid/common.yaml", console=None,
        overrides=[f"datasets_dir={data}", f"logs_dir={tmp_path / 'logs'}", f"checkpoints_dir={tmp_path / 'ck'}",
                   *sets])
    trained, scored = [], []
    exp.bus.subscribe(TrainDone, trained.append)
    exp.bus.subscribe(ValDone, scored.append)
    anyio.run(exp.run_async)
    return exp, trained, scored


def test_the_fedprox_file_runs_unchanged_apart_from_its_dirs(data: Path, tmp_path: Path) -> None:
    exp, trained, scored = run(data, tmp_path, "exp_opts.comm_rounds=4")
    assert exp.config.method == "fedprox" and len(exp.config.clients) == 5
    assert len(trained) == 4 * 5
    # sustain_rounds 2: rounds 1-2 on task 0, rounds 3-4 on task 1
    assert {(e.round, e.task.rsplit("-", 1)[1]) for e in trained} == {(1, "0"), (2, "0"), (3, "1"), (4, "1")}
    record = json.loads(exp.paths.record.read_text())
    metrics = record["data"]["client-2"]["4"]["client-2-task-0"]
    assert set(metrics) == {"val_rank_1", "val_rank_3", "val_rank_5", "val_rank_10", "val_map"}
    assert len({e.task for e in scored if e.round == 4}) == 5 * 6  # every client scored on every task


# The two methods with the most to build per task take half this file's time: CI runs them (`make test-slow`).
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in ("fedstil-atten", "fedweit") else m
                                    for m in METHODS])
def test_every_method_runs_from_the_same_files_through_a_task_switch(data: Path, tmp_path: Path, method: str) -> None:
    exp, trained, _ = run(data, tmp_path, f"exp_method={method}", "method_opts={}", "exp_opts.comm_rounds=3",
                          "exp_opts.val_interval=3")
    assert exp.config.method == method
    # all 5 clients train every round; sustain_rounds 2 moves each to its second task in round 3
    assert sorted(e.client for e in trained if e.round == 3 and e.task.endswith("task-1")) == [
        f"client-{c}" for c in range(5)]
    assert all(0.0 <= e.metrics["tr_acc"] <= 1.0 and e.metrics["tr_loss"] == e.metrics["tr_loss"] for e in trained)
    record = json.loads(exp.paths.record.read_text())
    assert record["status"] == "finished"
