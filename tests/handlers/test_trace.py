"""TraceRecorder: events as JSON lines in seq order, and a Chrome trace with one thread per device slot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedevents.engine.events import ClientFailed, ExperimentStarted, RoundStarted, TrainStarted, to_dict
from fedevents.handlers import TraceRecorder

pytestmark = pytest.mark.anyio


@pytest.fixture
def tracer(tmp_path: Path, bus):
    tracer = TraceRecorder(tmp_path / "out" / "events.jsonl", tmp_path / "out" / "trace.json")
    tracer.subscribe(bus)
    yield tracer
    tracer.close()


def chrome(tracer: TraceRecorder) -> list[dict]:
    doc = json.loads(tracer.chrome_path.read_text())
    assert isinstance(doc, list)  # the JSON array form, streamed as spans end
    return doc


def spans(tracer: TraceRecorder) -> dict[str, dict]:
    return {e["name"]: e for e in chrome(tracer) if e["ph"] == "X"}


def metadata(tracer: TraceRecorder, name: str) -> dict[tuple[int, int], str]:
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in chrome(tracer) if e["ph"] == "M" and e["name"] == name}


async def test_no_file_before_experiment_started(tracer, run) -> None:
    await run.emit(RoundStarted, round=1)
    tracer.close()
    assert not tracer.events_path.parent.exists()


async def test_events_file_has_one_line_per_event_in_seq_order(tracer, run) -> None:
    await run.start()
    await run.round_one()
    await run.finish()
    tracer.close()
    lines = [json.loads(line) for line in tracer.events_path.read_text().splitlines()]
    assert lines == [to_dict(e) for e in run.emitted]
    assert [line["seq"] for line in lines] == list(range(1, len(run.emitted) + 1))


async def test_events_are_flushed_at_round_end(tracer, run) -> None:
    await run.start()
    await run.round_one()
    assert len(tracer.events_path.read_text().splitlines()) == len(run.emitted)


async def test_a_training_span_sits_on_its_device_and_slot(tracer, run) -> None:
    await run.start()
    await run.round_one()
    tracer.close()
    # devices are ("cpu", "cuda:0"): cpu is process 1; slot 1 is thread 2 (Perfetto reserves 0).
    train = spans(tracer)["train c0 r1"]
    assert (train["pid"], train["tid"]) == (1, 2)
    assert (train["ts"], train["dur"]) == (500_000.0, 1_500_000.0)
    assert train["args"] == {"task": "t0", "waited_s": 0.25, "samples": 64,
                             "metrics": {"tr_acc": 0.5, "tr_loss": 1.0}}
    other = spans(tracer)["train c1 r1"]
    assert (other["pid"], other["tid"], other["ts"], other["dur"]) == (2, 1, 750_000.0, 1_750_000.0)
    assert metadata(tracer, "process_name") == {(1, 0): "cpu", (2, 0): "cuda:0"}
    assert metadata(tracer, "thread_name") == {(1, 2): "slot 1", (2, 1): "slot 0"}


async def test_a_validation_span_runs_to_the_last_val_done(tracer, run) -> None:
    await run.start()
    await run.round_one()
    tracer.close()
    val = spans(tracer)["val c0 r1"]
    assert (val["pid"], val["tid"], val["ts"], val["dur"]) == (1, 2, 3_000_000.0, 1_250_000.0)
    assert val["args"]["metrics"] == {"t0": {"val_acc": 0.4, "val_loss": 1.25},
                                      "t1": {"val_acc": 0.6, "val_loss": 1.5}}


async def test_round_starts_and_aggregations_are_global_instants(tracer, run) -> None:
    await run.start()
    await run.round_one()
    tracer.close()
    instants = [(e["name"], e["ts"], e["s"]) for e in chrome(tracer) if e["ph"] == "i"]
    assert instants == [("round 1 started", 250_000.0, "g"), ("aggregated r1", 4_500_000.0, "g")]


async def test_the_trace_is_valid_chrome_trace_event_format(tracer, run) -> None:
    await run.start()
    await run.round_one()
    await run.finish()
    tracer.close()
    for event in chrome(tracer):
        assert event["ph"] in {"X", "i", "M"}
        assert isinstance(event["name"], str)
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int)
        if event["ph"] != "M":
            assert isinstance(event["ts"], float) and event["ts"] >= 0
        if event["ph"] == "X":
            assert isinstance(event["dur"], float) and event["dur"] >= 0
            assert event["pid"] >= 1 and event["tid"] >= 1


async def test_a_failed_training_still_shows_its_span(tracer, run) -> None:
    await run.start()
    await run.emit(TrainStarted, 1.0, round=1, client="c1", task="t0", device="cuda:0", slot=1, waited_s=0.0)
    await run.emit(ClientFailed, 1.5, round=1, client="c1", task="t0", phase="train", error_type="ValueError",
                   error="bad batch")
    tracer.close()
    span = spans(tracer)["train c1 r1 (failed)"]
    assert (span["pid"], span["tid"], span["dur"]) == (2, 2, 500_000.0)
    assert span["args"]["error"] == "ValueError: bad batch"


async def test_summary_counts_trainings_per_slot_and_the_makespan(tracer, run) -> None:
    await run.start()
    await run.round_one()
    await run.finish()
    assert tracer.summary() == {
        "trainings": {("cpu", 1): 1, ("cuda:0", 0): 1},
        "busy_s": {("cpu", 1): 1.5, ("cuda:0", 0): 1.75},
        "total_trainings": 2,
        "makespan_s": 5.0,
    }


async def test_close_is_idempotent(tracer, run) -> None:
    await run.start()
    tracer.close()
    tracer.close()
    assert chrome(tracer)[0] == {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "cpu"}}


async def test_the_trace_of_a_run_that_died_still_parses(tracer, run) -> None:
    """Spans are appended before the closing bracket at each round's end: without close() the file parses."""
    await run.start()
    await run.round_one()
    events = json.loads(tracer.chrome_path.read_text())
    assert {e["name"] for e in events if e["ph"] == "X"} == {"train c0 r1", "train c1 r1", "val c0 r1"}


async def test_a_resumed_run_appends_after_the_earlier_spans(tmp_path, bus, run) -> None:
    first = TraceRecorder(tmp_path / "run.events.jsonl", tmp_path / "run.trace.json")
    first.subscribe(bus)
    await run.start()
    await run.round_one()  # the process dies here: no close()
    first._chrome.flush()
    for sub in first._subs:
        sub.unsubscribe()

    second = TraceRecorder(tmp_path / "run.events.jsonl", tmp_path / "run.trace.json")
    second.subscribe(bus)
    await run.emit(ExperimentStarted, 0.0, method="fedavg", rounds=2, clients=2, online_clients=2,
                   devices=("cpu", "cuda:0"), parallel=2, seed=1, dry_run=False, first_round=1, resumed=True)
    await run.round_one()
    second.close()
    events = json.loads((tmp_path / "run.trace.json").read_text())
    trains = sorted((e["ts"], e["name"]) for e in events if e["ph"] == "X" and e["name"].startswith("train c0"))
    assert len(trains) == 2  # the first process's span is kept
    # the resumed clock starts one second after the earlier trace's last event (the aggregation at 4.5 s)
    assert trains[1][0] == trains[0][0] + 4.5e6 + 1e6
