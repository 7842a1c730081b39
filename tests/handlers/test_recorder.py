"""JsonRecorder: the FedSTIL record, merged per (client, round, task), written atomically at round ends."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from fedevents.engine.errors import OutputError
from fedevents.engine.events import (
    ClientFailed,
    ClientUploaded,
    ExperimentFailed,
    ExperimentStarted,
    RoundFinished,
    RoundStarted,
    TrainDone,
    ValDone,
)
from fedevents.handlers import JsonRecorder

pytestmark = pytest.mark.anyio

CONFIG = {"exp_name": "demo", "exp_opts": {"comm_rounds": 2, "val_interval": 1}, "out": Path("runs/demo")}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def recorder(tmp_path: Path, bus):
    recorder = JsonRecorder(tmp_path / "out" / "record.json", CONFIG)
    recorder.subscribe(bus)
    yield recorder
    recorder.close()


async def train_done(run, client: str, rnd: int, task: str, **metrics: float) -> None:
    await run.emit(TrainDone, round=rnd, client=client, task=task, device="cpu", slot=0, waited_s=0.0,
                   ran_s=1.0, samples=8, metrics=metrics)


async def val_done(run, client: str, rnd: int, task: str, **metrics: float) -> None:
    await run.emit(ValDone, round=rnd, client=client, task=task, device="cpu", slot=0, ran_s=1.0,
                   samples=8, metrics=metrics)


async def round_finished(run, rnd: int) -> None:
    await run.emit(RoundFinished, round=rnd, trained=1, failed=0, validated=1, seconds=1.0)


async def test_no_file_before_experiment_started(recorder, run) -> None:
    await run.emit(RoundStarted, round=1)
    await round_finished(run, 1)
    recorder.close()
    assert not recorder.path.parent.exists()


async def test_train_and_val_metrics_of_one_key_are_merged(recorder, run) -> None:
    await run.start()
    await train_done(run, "c0", 1, "t0", tr_acc=0.5, tr_loss=1.0)
    await val_done(run, "c0", 1, "t0", val_acc=0.4, val_loss=1.25, val_rank_1=0.3)
    await val_done(run, "c1", 1, "t0", val_acc=0.6, val_loss=0.5)
    await train_done(run, "c1", 1, "t0", tr_acc=0.9, tr_loss=0.25)
    await round_finished(run, 1)
    data = load(recorder.path)["data"]
    assert data["c0"]["1"]["t0"] == {"tr_acc": 0.5, "tr_loss": 1.0, "val_acc": 0.4, "val_loss": 1.25,
                                     "val_rank_1": 0.3}
    assert data["c1"]["1"]["t0"] == {"val_acc": 0.6, "val_loss": 0.5, "tr_acc": 0.9, "tr_loss": 0.25}
    assert recorder.metrics("c0", 1, "t0")["val_rank_1"] == 0.3


async def test_the_record_is_written_at_round_ends_not_per_event(recorder, run) -> None:
    await run.start()
    started = load(recorder.path)
    assert started == {"config": {"exp_name": "demo", "exp_opts": {"comm_rounds": 2, "val_interval": 1},
                                  "out": "runs/demo"},
                       "run_id": "demo-run", "status": "running", "data": {}}
    await train_done(run, "c0", 1, "t0", tr_acc=0.5)
    assert load(recorder.path)["data"] == {}
    await round_finished(run, 1)
    assert load(recorder.path)["data"] == {"c0": {"1": {"t0": {"tr_acc": 0.5}}}}
    assert load(recorder.path)["last_round"] == 1


async def test_a_finished_run_is_marked_finished(recorder, run) -> None:
    await run.start()
    await run.round_one()
    await run.finish()
    record = load(recorder.path)
    assert record["status"] == "finished"
    assert "error" not in record
    assert list(record["data"]) == ["c0", "c1"]
    assert record["data"]["c0"]["1"]["t1"] == {"val_acc": 0.6, "val_loss": 1.5}


async def test_a_failed_run_records_its_error_and_failed_clients(recorder, run) -> None:
    await run.start()
    await run.emit(ClientFailed, round=1, client="c1", task="t0", phase="train", error_type="ValueError",
                   error="bad batch")
    await run.emit(ExperimentFailed, round=1, reason="client c1 failed in round 1 while training", error_type="RunFailed")
    record = load(recorder.path)
    assert (record["status"], record["error"]) == ("failed", "client c1 failed in round 1 while training")
    assert record["failures"] == [{"round": 1, "client": "c1", "task": "t0", "phase": "train",
                                   "error": "ValueError: bad batch"}]


async def test_close_without_an_end_event_records_a_failed_run(recorder, run) -> None:
    await run.start()
    await train_done(run, "c0", 1, "t0", tr_acc=0.5)
    recorder.close()
    recorder.close()
    record = load(recorder.path)
    assert record["status"] == "failed"
    assert record["error"] == "the run stopped before it finished"
    assert record["data"] == {"c0": {"1": {"t0": {"tr_acc": 0.5}}}}


async def test_a_failed_write_leaves_the_previous_record_whole(recorder, bus, run, monkeypatch) -> None:
    await run.start()
    await train_done(run, "c0", 1, "t0", tr_acc=0.5)
    await round_finished(run, 1)
    before = recorder.path.read_bytes()

    def no_replace(src, dst) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_replace)
    await train_done(run, "c0", 2, "t0", tr_acc=0.75)
    with pytest.raises(OutputError, match=r"^cannot write .*record\.json: No space left on device; the run stopped"):
        await round_finished(run, 2)  # a record that cannot be written stops the run, before its checkpoint
    assert bus.output_error is not None and bus.sink_errors == 0
    assert recorder.path.read_bytes() == before
    assert load(recorder.path)["data"] == {"c0": {"1": {"t0": {"tr_acc": 0.5}}}}
    assert sorted(p.name for p in recorder.path.parent.iterdir()) == ["record.json"]
    monkeypatch.undo()
    recorder.close()
    assert load(recorder.path)["data"]["c0"]["2"] == {"t0": {"tr_acc": 0.75}}


async def test_rounds_are_kept_in_numeric_order(recorder, run) -> None:
    await run.start()
    for rnd in (9, 10, 2):
        await train_done(run, "c0", rnd, "t0", tr_acc=rnd / 10)
    await round_finished(run, 10)
    assert list(load(recorder.path)["data"]["c0"]) == ["2", "9", "10"]


async def test_a_resumed_run_keeps_the_rounds_before_it(tmp_path: Path, bus, run) -> None:
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"config": {}, "run_id": "old", "status": "failed", "data": {
        "c0": {"1": {"t0": {"tr_acc": 0.1}}, "2": {"t0": {"tr_acc": 0.2}}, "3": {"t0": {"tr_acc": 0.3}}}}}))
    recorder = JsonRecorder(path, CONFIG)
    recorder.subscribe(bus)
    await run.emit(ExperimentStarted, method="fedavg", rounds=4, clients=1, online_clients=1, devices=("cpu",),
                   parallel=1, seed=1, dry_run=False, first_round=3, resumed=True)
    await train_done(run, "c0", 3, "t0", tr_acc=0.35)
    await round_finished(run, 3)
    recorder.close()
    assert load(path)["data"] == {"c0": {"1": {"t0": {"tr_acc": 0.1}}, "2": {"t0": {"tr_acc": 0.2}},
                                         "3": {"t0": {"tr_acc": 0.35}}}}


async def test_the_record_keeps_one_line_per_client(recorder, run) -> None:
    await run.start()
    await run.round_one()
    text = recorder.path.read_text()
    assert '    "c1": {"1": {"t0": {"tr_acc": 0.7, "tr_loss": 0.8}}}\n' in text


async def test_a_finished_round_is_encoded_once_however_often_the_record_is_written(recorder, run,
                                                                                    monkeypatch) -> None:
    """Issue 12: every round's write encoded every client of the run again."""
    from fedevents.handlers import recorder as module

    made: list[object] = []
    encode = module._text
    monkeypatch.setattr(module, "_text", lambda value: made.append(value) or encode(value))
    await run.start()
    await train_done(run, "c0", 1, "t0", tr_acc=0.5)
    await train_done(run, "c1", 1, "t0", tr_acc=0.25)
    await round_finished(run, 1)
    assert sorted(made, key=str) == [{"t0": {"tr_acc": 0.25}}, {"t0": {"tr_acc": 0.5}}]
    made.clear()
    await train_done(run, "c2", 2, "t0", tr_acc=0.125)
    await round_finished(run, 2)
    await round_finished(run, 3)
    assert made == [{"t0": {"tr_acc": 0.125}}]  # c0's and c1's round 1 were written from their text
    assert recorder.path.read_text() == module.format_record(recorder._snapshot() | {"data": recorder._data.as_dict()})
    assert load(recorder.path)["data"]["c1"] == {"1": {"t0": {"tr_acc": 0.25}}}


async def uploaded(run, client: str, rnd: int, nbytes: int) -> None:
    await run.emit(ClientUploaded, round=rnd, client=client, task="t0", samples=8, nbytes=nbytes)


async def test_uploads_and_their_bytes_are_counted_per_round(recorder, run) -> None:
    await run.start()
    await uploaded(run, "c0", 1, 100)
    await uploaded(run, "c1", 1, 150)
    await uploaded(run, "c0", 2, 100)
    await round_finished(run, 2)
    assert load(recorder.path)["comm"] == {"uploads": 3, "upload_bytes": 350,
                                           "by_round": {"1": [2, 250], "2": [1, 100]}}


async def test_a_resumed_run_counts_uploads_of_repeated_rounds_once(tmp_path: Path, bus, run) -> None:
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"config": {}, "run_id": "old", "status": "running", "data": {},
                                "comm": {"uploads": 3, "upload_bytes": 30, "by_round": {"1": [1, 10], "2": [2, 20]}}}))
    recorder = JsonRecorder(path, CONFIG)
    recorder.subscribe(bus)
    await run.emit(ExperimentStarted, method="fedavg", rounds=3, clients=1, online_clients=1, devices=("cpu",),
                   parallel=1, seed=1, dry_run=False, first_round=2, resumed=True)
    await uploaded(run, "c0", 2, 20)  # round 2 is run again: its earlier count must not stay
    await round_finished(run, 2)
    recorder.close()
    assert load(path)["comm"] == {"uploads": 2, "upload_bytes": 30, "by_round": {"1": [1, 10], "2": [1, 20]}}


async def test_kept_scores_land_under_each_round_that_keeps_them(recorder, run, tmp_path: Path) -> None:
    from fedevents.engine.events import ValReused

    await run.start()
    await train_done(run, "c0", 1, "t0", tr_acc=0.5)
    await val_done(run, "c0", 1, "t0", val_acc=0.25)
    await val_done(run, "c0", 1, "t1", val_acc=0.75)
    await round_finished(run, 1)
    kept = ({"t0": {"val_acc": 0.25}, "t1": {"val_acc": 0.75}},)
    for rnd in (2, 3):
        await run.emit(ValReused, round=rnd, clients=("c0",), scored_in=(1,), scores=kept)
        await round_finished(run, rnd)
    await train_done(run, "c0", 3, "t1", tr_acc=0.875)  # never seen in a run; must not reach round 2
    data = load(recorder.path)["data"]["c0"]
    assert data["1"] == {"t0": {"tr_acc": 0.5, "val_acc": 0.25}, "t1": {"val_acc": 0.75}}
    assert data["2"] == data["3"] == {"t0": {"val_acc": 0.25}, "t1": {"val_acc": 0.75}}
    assert recorder.metrics("c0", 3, "t1") == {"val_acc": 0.75, "tr_acc": 0.875}
    assert recorder.metrics("c0", 2, "t1") == {"val_acc": 0.75}


async def test_the_record_text_is_the_same_when_rounds_are_written_again(recorder, run) -> None:
    # The recorder keeps the text of earlier rounds; each write must equal a fresh encoding of the whole.
    from fedevents.handlers.recorder import format_record

    await run.start()
    for rnd in (1, 2, 3):
        await val_done(run, "c0", rnd, "t0", val_acc=rnd / 4, val_loss=float("nan") if rnd == 2 else 1.0)
        if rnd != 2:
            await train_done(run, "c1", rnd, "t0", tr_acc=rnd / 8)
        await round_finished(run, rnd)
        text = recorder.path.read_text()
        assert text == format_record(json.loads(text))
    assert load(recorder.path)["data"]["c0"]["2"]["t0"]["val_loss"] == "NaN"
    assert math.isnan(recorder.metrics("c0", 2, "t0")["val_loss"]) and recorder.metrics("c0", 3, "t0")["val_acc"] == 0.75
    assert list(load(recorder.path)["data"]["c0"]) == ["1", "2", "3"] and list(load(recorder.path)["data"]) == ["c0", "c1"]
