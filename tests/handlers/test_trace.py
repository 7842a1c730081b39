"""TraceRecorder: events as JSON lines in seq order, and a Chrome trace with one thread per device slot."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fedevents.engine import read_events
from fedevents.engine.errors import OutputError
from fedevents.engine.eventfile import is_header
from fedevents.engine.events import (
    ClientFailed,
    ExperimentStarted,
    RoundFinished,
    RoundStarted,
    TrainDone,
    TrainStarted,
    ValDone,
    ValStarted,
    json_safe,
    to_dict,
)
from fedevents.handlers import TraceRecorder

from .conftest import T0, Run

pytestmark = pytest.mark.anyio

HEADER = {"stream": "fedevents.events", "schema": 1, "run_id": "demo-run", "exp_name": "demo"}


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


async def test_events_file_is_one_header_then_one_line_per_event_in_seq_order(tracer, run) -> None:
    await run.start()
    await run.round_one()
    await run.finish()
    tracer.close()
    header, *lines = [json.loads(line) for line in tracer.events_path.read_text().splitlines()]
    assert header == HEADER
    assert lines == [{k: v for k, v in json_safe(to_dict(e)).items() if k not in HEADER} for e in run.emitted]
    assert list(read_events(tracer.events_path)) == [json_safe(to_dict(e)) for e in run.emitted]
    assert [line["seq"] for line in lines] == list(range(1, len(run.emitted) + 1))


async def test_events_are_flushed_at_round_end(tracer, run) -> None:
    await run.start()
    await run.round_one()
    assert len(list(read_events(tracer.events_path))) == len(run.emitted)


async def test_an_event_of_another_run_keeps_its_own_run_fields(tracer, run, bus) -> None:
    await run.start()
    stray = await Run(bus, run_id="other-run", exp_name="other").emit(RoundStarted, 1.0, round=1)
    tracer.close()
    assert list(read_events(tracer.events_path))[-1] == to_dict(stray)


def stream(tmp_path: Path, compress: bool) -> Path:
    return tmp_path / ("run.events.jsonl.gz" if compress else "run.events.jsonl")


def raw_lines(path: Path) -> list[dict]:
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        return [json.loads(line) for line in f]


async def die(tracer: TraceRecorder) -> None:
    """The process ends without close(): what was flushed stays, nothing more is written."""
    for sub in tracer._subs:
        sub.unsubscribe()


async def resume(run, tmp_path: Path, compress: bool) -> TraceRecorder:
    tracer = TraceRecorder(stream(tmp_path, compress), None, compress_events=compress)
    tracer.subscribe(run.bus)
    await run.emit(ExperimentStarted, 6.0, method="fedavg", rounds=2, clients=2, online_clients=2,
                   devices=("cpu", "cuda:0"), parallel=2, seed=1, dry_run=False, first_round=1, resumed=True)
    return tracer


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
async def test_a_stream_resumed_after_a_kill_mid_write_keeps_its_one_header(tmp_path, bus, run, compress) -> None:
    first = TraceRecorder(stream(tmp_path, compress), None, compress_events=compress)
    first.subscribe(bus)
    await run.start()
    await run.round_one()  # flushed at the round's end
    await die(first)
    cut = b'{"event":"RoundStarted","seq":19,"wa'  # a kill in the middle of a write
    with open(stream(tmp_path, compress), "ab") as f:
        f.write(gzip.compress(cut + b'll_time":1.0}\n')[:20] if compress else cut)

    second = await resume(run, tmp_path, compress)
    await run.round_one()
    second.close()
    lines = raw_lines(stream(tmp_path, compress))
    assert lines[0] == HEADER and sum(is_header(line) for line in lines) == 1
    assert list(read_events(stream(tmp_path, compress))) == [json_safe(to_dict(e)) for e in run.emitted]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
async def test_a_stream_whose_header_was_cut_gets_it_on_resume(tmp_path, run, compress) -> None:
    cut = b'{"stream":"fedevents.events","sch'
    stream(tmp_path, compress).write_bytes(gzip.compress(cut)[:15] if compress else cut)
    tracer = await resume(run, tmp_path, compress)
    await run.finish()
    tracer.close()
    assert raw_lines(stream(tmp_path, compress))[0] == HEADER
    assert list(read_events(stream(tmp_path, compress))) == [json_safe(to_dict(e)) for e in run.emitted]


async def test_a_stream_from_before_headers_gets_one_before_the_resumed_events(tmp_path, run) -> None:
    older = {"event": "RoundStarted", "schema": 1, "run_id": "demo-run", "exp_name": "demo", "seq": 1,
             "wall_time": 1.0, "mono_time": 2.0, "round": 0}
    stream(tmp_path, False).write_text(json.dumps(older) + "\n")
    tracer = await resume(run, tmp_path, False)
    tracer.close()
    assert raw_lines(stream(tmp_path, False))[:2] == [older, HEADER]
    assert list(read_events(stream(tmp_path, False))) == [older, to_dict(run.emitted[0])]


async def test_a_stream_under_another_experiment_name_gets_this_runs_header_before_its_events(tmp_path, run) -> None:
    renamed = {**HEADER, "exp_name": "old name"}
    older = {"event": "RoundStarted", "seq": 1, "wall_time": 1.0, "mono_time": 2.0, "round": 0}
    stream(tmp_path, False).write_text(json.dumps(renamed) + "\n" + json.dumps(older) + "\n")
    tracer = await resume(run, tmp_path, False)
    tracer.close()
    assert raw_lines(stream(tmp_path, False))[2] == HEADER
    assert [e["exp_name"] for e in read_events(stream(tmp_path, False))] == ["old name", "demo"]


@pytest.mark.parametrize(("first", "message"), [
    (json.dumps({**HEADER, "run_id": "other-run"}),
     ": expected the events of run demo-run, found those of run other-run"),
    ("garbage", ":1: expected a JSON object, found 'garbage\\n'"),
])
async def test_a_resumed_run_refuses_a_stream_that_is_not_its_own(tmp_path, bus, run, first, message) -> None:
    text = first + "\n"
    stream(tmp_path, False).write_text(text)
    with pytest.raises(OutputError) as info:
        await resume(run, tmp_path, False)
    assert str(info.value) == f"{stream(tmp_path, False)}{message}; move it away and run the same command with --resume"
    assert stream(tmp_path, False).read_text() == text  # left as it was


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


class _Float64(float):
    pass


# Span fields with awkward values: escapes, non-ASCII, NaN and infinities (the whole span then goes through
# json_safe), ints and bools where numbers go, float subclasses, nested and non-str-keyed metrics.
_TASKS = ["t0", 'ü "q" \\ \n\u2028', ""]
_WAITS = [0.25, float("nan"), float("inf"), 3, _Float64(0.5), -0.0, 5e-324, 1e22, True, 1e-05]
_SAMPLE_COUNTS = [64, 2**70, True]
_METRICS = [{"tr_acc": 0.5, "tr_loss": 1e-7}, {}, {"tr_loss": float("nan")}, {"n": 3}, {"ü": _Float64(1.0)},
            {"t": {"n": 3}}, {1: 0.5}, {"ok": True}, {"big": 2**70}, {"l": [1.5, float("-inf")]}]
_SLOTS = [0, 1, True]


def _reference(span: dict) -> str:
    """A span as json.dumps writes its dict, strictly: json_safe's strings for NaN and the infinities."""
    try:
        return json.dumps(span, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(json_safe(span), separators=(",", ":"), allow_nan=False, default=str)


def _items(path: Path) -> list[str]:
    """The trace's items as the text of their lines."""
    lines = path.read_text().splitlines()
    assert (lines[0], lines[-1]) == ("[", "]")
    return [line[:-1] if line.endswith(",") else line for line in lines[1:-1]]


async def test_every_training_span_is_the_json_of_its_dict_for_awkward_values(tracer, run) -> None:
    """Spans are written as text from the events' fields: the same bytes as their dicts through json."""
    await run.start()
    expected = []
    for i in range(60):
        at = 1.0 + i
        fields = dict(round=1, client=f"c{i}", task=_TASKS[i % 3], device=("cpu", "cuda:0")[i % 2],
                      slot=_SLOTS[i % 3])
        started = i % 4 != 0  # a TrainDone without its TrainStarted starts ran_s before it ends
        if started:
            await run.emit(TrainStarted, at, **fields, waited_s=0.0)
        ran_s = float("nan") if i == 7 else 0.5  # a start that is not a number: ts and dur are NaN
        done = await run.emit(TrainDone, at + 0.75, **fields, waited_s=_WAITS[i % len(_WAITS)], ran_s=ran_s,
                              samples=_SAMPLE_COUNTS[i % 3], metrics=_METRICS[i % len(_METRICS)])
        start = T0 + at if started else done.mono_time - ran_s
        expected.append({
            "ph": "X", "name": f"train c{i} r1", "cat": "train", "ts": round((start - T0) * 1e6 + 0.0, 3),
            "dur": round(max(done.mono_time - start, 0.0) * 1e6, 3), "pid": 1 + i % 2, "tid": _SLOTS[i % 3] + 1,
            "args": {"task": done.task, "waited_s": done.waited_s, "samples": done.samples,
                     "metrics": dict(done.metrics)}})
    tracer.close()
    written = [item for item in _items(tracer.chrome_path) if item.startswith('{"ph":"X"')]
    assert written == [_reference(span) for span in expected]


async def test_validation_spans_are_the_json_of_their_dicts_for_awkward_values(tracer, run) -> None:
    await run.start()
    await run.emit(ValStarted, 1.0, round=1, client="c0", device="cpu", slot=1, waited_s=float("inf"))
    first = await run.emit(ValDone, 1.5, round=1, client="c0", task="t0", device="cpu", slot=1, ran_s=0.5,
                           samples=4, metrics={"val_acc": float("nan"), "n": 3})
    last = await run.emit(ValDone, 2.25, round=1, client="c0", task="ü", device="cpu", slot=1, ran_s=0.75,
                          samples=4, metrics={"val_acc": _Float64(0.5)})
    alone = await run.emit(ValDone, 3.0, round=1, client="c1", task="t0", device="cuda:0", slot=0, ran_s=0.5,
                           samples=4, metrics={"nested": {"a": 1.0}})
    await run.emit(RoundFinished, 3.5, round=1, trained=0, failed=0, validated=2, seconds=3.0)
    tracer.close()
    # The metrics as the events hold them (a nested mapping is read-only there, and written as its text).
    expected = [
        {"ph": "X", "name": "val c0 r1", "cat": "val", "ts": 1_000_000.0, "dur": 1_250_000.0, "pid": 1, "tid": 2,
         "args": {"waited_s": float("inf"), "metrics": {"t0": dict(first.metrics), "ü": dict(last.metrics)}}},
        {"ph": "X", "name": "val c1 r1", "cat": "val", "ts": 2_500_000.0, "dur": 500_000.0, "pid": 2, "tid": 1,
         "args": {"metrics": {"t0": dict(alone.metrics)}}},
    ]
    written = [item for item in _items(tracer.chrome_path) if item.startswith('{"ph":"X"')]
    assert written == [_reference(span) for span in expected]


async def test_without_a_trace_file_the_events_and_the_summary_are_the_same(tmp_path, bus, run) -> None:
    both = TraceRecorder(tmp_path / "both.events.jsonl", tmp_path / "both.trace.json")
    alone = TraceRecorder(tmp_path / "alone.events.jsonl", None)
    both.subscribe(bus)
    alone.subscribe(bus)
    await run.start()
    await run.round_one()
    await run.emit(TrainStarted, 4.75, round=2, client="c1", task="t0", device="cuda:0", slot=1, waited_s=0.0)
    await run.emit(ClientFailed, 4.9, round=2, client="c1", task="t0", phase="train", error_type="ValueError",
                   error="bad batch")
    await run.finish()
    assert alone.summary() == both.summary()
    both.close()
    alone.close()
    assert (tmp_path / "alone.events.jsonl").read_bytes() == (tmp_path / "both.events.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.events.jsonl", "both.events.jsonl",
                                                         "both.trace.json"]
