"""LogSink: JSON lines for every log line (the events live in the events stream), a person-sized console."""

from __future__ import annotations

import gzip
import io
import json
import re
import threading
from pathlib import Path

import anyio
import pytest
import structlog
from structlog.contextvars import bound_contextvars

from fedevents.engine.events import (
    ClientFailed,
    ExperimentFailed,
    RoundFinished,
    RoundStarted,
)
from fedevents.handlers import LogSink, configure_logging

pytestmark = pytest.mark.anyio


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def console_messages(console: io.StringIO) -> list[str]:
    """The console lines without their timestamp: ``[level] message``."""
    return [line.split(" ", 1)[1] for line in console.getvalue().splitlines()]


@pytest.fixture
def console() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def sink(tmp_path: Path, bus, console):
    sink = LogSink(tmp_path / "logs" / "run.jsonl", console=console, pretty=False)
    sink.subscribe(bus)
    yield sink
    sink.close()


async def test_no_file_before_experiment_started(tmp_path: Path, bus, run) -> None:
    sink = LogSink(tmp_path / "logs" / "run.jsonl", console=None)
    sink.subscribe(bus)
    await run.emit(RoundStarted, round=1)
    sink.close()
    assert not (tmp_path / "logs").exists()


async def test_the_log_holds_log_lines_and_not_the_events_again(sink, run) -> None:
    """Each event is written once, by the events stream; the log has the run's lines, bound to the run."""
    await run.start()
    await run.round_one()
    await run.finish()
    sink.close()
    lines = read_lines(sink.jsonl_path)
    assert [(line["logger"], line["event"].split("  ")[0]) for line in lines] == [
        ("fedevents.run", "experiment demo started"),
        ("fedevents.run", "round 1/2"),
        ("fedevents.run", "experiment demo finished"),
    ]
    assert {line["run_id"] for line in lines} == {"demo-run"}


async def test_a_compressed_log_is_a_gzip_stream_that_standard_tools_read(tmp_path: Path, bus, run) -> None:
    sink = LogSink(tmp_path / "run.log.jsonl.gz", console=None, compress=True)
    sink.subscribe(bus)
    await run.start()
    await run.round_one()  # the round's end flushes: one gzip member
    await run.finish()
    sink.close()
    with gzip.open(tmp_path / "run.log.jsonl.gz", "rt") as f:
        lines = [json.loads(line) for line in f]
    assert [line["event"].split("  ")[0] for line in lines] == [
        "experiment demo started", "round 1/2", "experiment demo finished"]


async def test_without_a_file_the_console_still_gets_the_summary(bus, run, console) -> None:
    sink = LogSink(None, console=console, pretty=False)
    sink.subscribe(bus)
    await run.start()
    await run.round_one()
    sink.close()
    assert console_messages(console)[-1].startswith("[info] round 1/2  clients 2 trained")


async def test_a_worker_thread_line_carries_the_dispatching_task_context(sink, run) -> None:
    await run.start()

    def train() -> None:
        structlog.get_logger("fedevents.federated").info("epoch finished", epoch=3, loss=0.25)

    with bound_contextvars(round=2, client="c1"):
        await anyio.to_thread.run_sync(train)
    sink.close()
    [line] = [line for line in read_lines(sink.jsonl_path) if line["event"] == "epoch finished"]
    assert line["round"] == 2
    assert line["client"] == "c1"
    assert line["run_id"] == "demo-run"
    assert line["logger"] == "fedevents.federated"
    assert (line["epoch"], line["loss"], line["level"]) == (3, 0.25, "info")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"])


async def test_console_round_summary_gives_the_means_of_the_round(sink, run, console) -> None:
    await run.start(rounds=2)
    await run.round_one()
    assert console_messages(console)[-1] == (
        "[info] round 1/2  clients 2 trained  tr_acc 0.600 tr_loss 0.900  val_acc 0.500  4.25s"
    )


async def test_the_summary_lands_in_the_file_with_all_means(sink, run) -> None:
    await run.start()
    await run.round_one()
    sink.close()
    [line] = [line for line in read_lines(sink.jsonl_path) if line["logger"] == "fedevents.run"
              and line.get("round") == 1]
    assert line["train"] == pytest.approx({"tr_acc": 0.6, "tr_loss": 0.9})
    assert line["val"] == pytest.approx({"val_acc": 0.5, "val_loss": 1.375})
    assert (line["trained"], line["failed"], line["validated"]) == (2, 0, 1)


async def test_console_shows_only_lines_meant_for_a_person(sink, run, console) -> None:
    await run.start()
    await run.round_one()
    await run.finish()
    messages = console_messages(console)
    assert len(messages) == 3
    assert messages[0].startswith("[info] experiment demo started  fedavg  2 clients (2 online)  2 rounds")
    assert "devices cpu,cuda:0 × 2 parallel" in messages[0]
    assert messages[1].startswith("[info] round 1/2")
    assert messages[2].startswith("[info] experiment demo finished  2 rounds in 5.00s  record ")
    assert "TrainDone" not in console.getvalue()


async def test_failures_reach_the_console_as_error_lines(sink, run, console) -> None:
    await run.start()
    await run.emit(ClientFailed, 1.0, round=1, client="c1", task="t0", phase="train", error_type="ValueError",
                   error="bad batch", traceback="Traceback ...")
    await run.emit(RoundFinished, 1.0, round=1, trained=1, failed=1, validated=0, seconds=1.0)
    await run.emit(ExperimentFailed, 1.5, round=1, reason="client c1 failed in round 1", error_type="RunFailed")
    assert console_messages(console)[1:] == [
        "[error] client c1 failed in round 1 while training t0: ValueError: bad batch",
        "[info] round 1/2  clients 1 trained, 1 failed  1.00s",
        "[error] experiment demo failed in round 1: client c1 failed in round 1",
    ]


async def test_a_failing_sink_is_logged_to_file_and_console(sink, bus, run, console) -> None:
    def broken(event) -> None:
        raise RuntimeError("disk on fire")

    bus.subscribe(RoundStarted, broken)
    await run.start()
    await run.emit(RoundStarted, 0.5, round=1)
    sink.close()
    assert "sink failed" in console.getvalue()
    assert "error=RuntimeError: disk on fire" in console.getvalue()
    [line] = [line for line in read_lines(sink.jsonl_path) if line["event"] == "sink failed"]
    assert (line["level"], line["logger"], line["failed_event"]) == ("error", "fedevents.bus", "RoundStarted")


async def test_pretty_console_uses_the_console_renderer(tmp_path: Path, bus, run, console) -> None:
    sink = LogSink(tmp_path / "run.jsonl", console=console, pretty=True)
    sink.subscribe(bus)
    try:
        await run.start()
        await run.round_one()
    finally:
        sink.close()
    assert "round 1/2  clients 2 trained" in console.getvalue()
    assert "\x1b[" in console.getvalue()  # ConsoleRenderer colours


async def test_level_warning_hides_summaries_but_the_file_keeps_them(tmp_path: Path, bus, run, console) -> None:
    sink = LogSink(tmp_path / "run.jsonl", console=console, pretty=False, level="warning")
    sink.subscribe(bus)
    try:
        await run.start()
        await run.round_one()
    finally:
        sink.close()
    assert console.getvalue() == ""
    assert sum(line["logger"] == "fedevents.run" for line in read_lines(tmp_path / "run.jsonl")) == 2


async def test_close_restores_structlog_and_is_idempotent(sink, run) -> None:
    before = structlog.get_config()
    await run.start()
    assert structlog.get_config() != before
    sink.close()
    sink.close()
    assert structlog.get_config() == before
    size = sink.jsonl_path.stat().st_size
    structlog.get_logger("fedevents.federated").info("after the run")
    assert sink.jsonl_path.stat().st_size == size


async def test_concurrent_threads_write_whole_lines(sink, run) -> None:
    await run.start()
    log = structlog.get_logger("fedevents.federated")

    def chatter(worker: int) -> None:
        for i in range(300):
            log.info("epoch finished", worker=worker, epoch=i, pad="x" * 200)

    threads = [threading.Thread(target=chatter, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.close()
    lines = [line for line in read_lines(sink.jsonl_path) if line["event"] == "epoch finished"]
    assert len(lines) == 8 * 300
    assert {(line["worker"], line["epoch"]) for line in lines} == {(w, i) for w in range(8) for i in range(300)}


def test_an_unknown_level_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="level must be one of debug, info, warning, error, critical, found 'loud'"):
        LogSink(tmp_path / "run.jsonl", level="loud")


def test_the_sink_runs_before_work_handlers(tmp_path: Path, bus) -> None:
    """Work handlers (priority 0) await the work; the sink must log the event before that, in seq order."""
    [sub] = LogSink(tmp_path / "run.jsonl", console=None).subscribe(bus)
    assert sub.priority > 0
    assert sub.types is None  # every event


async def test_a_closed_sink_ignores_a_later_run(tmp_path: Path, bus, run) -> None:
    sink = LogSink(tmp_path / "logs" / "run.jsonl", console=None)
    sink.subscribe(bus)
    sink.close()
    await run.start()
    assert not (tmp_path / "logs").exists()


def test_configure_logging_alone_writes_lines_and_restores(tmp_path: Path) -> None:
    jsonl, console = io.StringIO(), io.StringIO()
    setup = configure_logging(jsonl, console=console, pretty=False, bind={"run_id": "r1"})
    log = structlog.get_logger("fedevents.federated")
    try:
        log.debug("too fine")
        log.info("epoch finished", epoch=1)
        log.warning("slow device", device="cuda:1")
    finally:
        setup.restore()
        setup.restore()
    lines = [json.loads(line) for line in jsonl.getvalue().splitlines()]
    assert [(line["event"], line["level"], line["run_id"]) for line in lines] == [
        ("epoch finished", "info", "r1"), ("slow device", "warning", "r1")]
    assert console_messages(console) == ["[warning] slow device  device=cuda:1 run_id=r1 logger=fedevents.federated"]


async def test_kept_scores_count_in_the_round_means(sink, run, console) -> None:
    from fedevents.engine.events import RoundFinished, RoundStarted, ValDone, ValReused

    await run.start(rounds=2)
    await run.emit(RoundStarted, 0.25, round=1)
    await run.emit(ValDone, 0.5, round=1, client="c0", task="t0", device="cpu", slot=0, ran_s=0.25, samples=4,
                   metrics={"val_acc": 0.375, "val_loss": 1.0})
    await run.emit(ValReused, 0.5, round=1, clients=("c1",), scored_in=(0,),
                   scores=({"t0": {"val_acc": 0.875, "val_loss": 0.5}},))
    await run.emit(RoundFinished, 1.25, round=1, trained=0, failed=0, validated=2, seconds=1.0, reused=1)
    assert console_messages(console)[-1] == "[info] round 1/2  clients 2 validated  val_acc 0.625  1.00s"
