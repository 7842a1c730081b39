"""User handlers that misbehave: hang, overrun, block the loop, raise SystemExit, change what they get."""

from __future__ import annotations

import asyncio
import json
import operator
import sys
import time
from pathlib import Path
from types import MappingProxyType

import anyio
import pytest
from structlog.testing import capture_logs

from fedevents.engine import EventBus, RoundStarted, TrainDone
from fedevents.engine.errors import HandlerFailed
from fedevents.engine.events import ClientsSampled, to_dict
from fedevents.engine.runner import STOP_GRACE_S

from .conftest import experiment, fedevents, record

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

HANDLERS = '''
import os, signal, time
import anyio

class Hang:
    """An async handler that never returns once it sees `at` in `round` (after sending `signal` once, if any)."""
    def __init__(self, at, round, signal=None):
        self.at, self.round, self.signal, self.fired = at, round, signal, False
    def subscribe(self, bus):
        from fedevents.engine import ALL
        return [bus.subscribe(ALL, self)]
    async def __call__(self, ev):
        if type(ev).__name__ == self.at and getattr(ev, "round", None) == self.round:
            if self.signal and not self.fired:
                self.fired = True
                with open("signalled_at", "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), getattr(signal, self.signal))
            await anyio.sleep_forever()

class Exits:
    """A sink that raises SystemExit on RoundFinished of round 2 and KeyboardInterrupt on RoundStarted of 3."""
    events = ()
    def __init__(self):
        from fedevents.engine import RoundFinished, RoundStarted
        self.events = (RoundFinished, RoundStarted)
    def __call__(self, ev):
        if type(ev).__name__ == "RoundFinished" and ev.round == 2:
            raise SystemExit(3)
        if type(ev).__name__ == "RoundStarted" and ev.round == 3:
            raise KeyboardInterrupt

class TaskExits:
    """An async sink whose own task, started in its own task group, raises SystemExit on RoundFinished of 2."""
    def subscribe(self, bus):
        from fedevents.engine import RoundFinished
        return [bus.subscribe(RoundFinished, self)]
    async def __call__(self, ev):
        if ev.round == 2:
            async def child():
                raise SystemExit(5)
            async with anyio.create_task_group() as tg:
                tg.start_soon(child)
                await anyio.sleep(5)

class Blocks:
    """Holds the event loop for `seconds` on the second TrainStarted of round 1 (a slow sync handler)."""
    def __init__(self, seconds):
        self.seconds, self.seen = seconds, 0
    def subscribe(self, bus):
        from fedevents.engine import TrainStarted
        return [bus.subscribe(TrainStarted, self)]
    def __call__(self, ev):
        if ev.round == 1:
            self.seen += 1
            if self.seen == 2:
                time.sleep(self.seconds)
'''


def _setup(folder: Path, **exp_opts) -> Path:
    exp = experiment(folder, **exp_opts)
    (folder / "hostile_handlers.py").write_text(HANDLERS)
    return exp


def _with(handler: dict) -> list[str]:
    return ["--set", f"handlers=[{json.dumps(handler)}]"]


@pytest.mark.parametrize(("at", "sig", "status"), [("RoundStarted", "SIGINT", 130), ("RoundFinished", "SIGTERM", 143)])
def test_one_signal_stops_a_run_whose_handler_never_returns(tmp_path: Path, at: str, sig: str, status: int) -> None:
    exp = _setup(tmp_path)
    hang = {"target": "hostile_handlers:Hang", "kwargs": {"at": at, "round": 3, "signal": sig}}
    run = fedevents("run", str(exp), *_with(hang), cwd=tmp_path, timeout=120)
    took = time.time() - float((tmp_path / "signalled_at").read_text())
    assert run.returncode == status, run.stderr
    assert f"fedevents: interrupted: interrupted by {sig} in round 3" in run.stderr
    assert "Traceback" not in run.stderr
    rec = record(tmp_path)
    assert rec["status"] == "interrupted"
    assert rec["error"].startswith(f"stopped by {sig}; resume from round 2")
    # The documented grace, plus the final record and the interpreter's exit: never the hang's forever.
    assert STOP_GRACE_S <= took < STOP_GRACE_S + 25


def test_a_handler_over_its_time_limit_is_cancelled_and_named(tmp_path: Path) -> None:
    exp = _setup(tmp_path, handler_timeout_s=1)
    hang = {"target": "hostile_handlers:Hang", "kwargs": {"at": "RoundStarted", "round": 2}}
    run = fedevents("run", str(exp), *_with(hang), cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    [line] = [line for line in run.stderr.splitlines() if "sink failed" in line]
    assert "handler=Hang" in line and "failed_event=RoundStarted" in line
    assert "error=TimeoutError: cancelled after exp_opts.handler_timeout_s = 1s" in line
    assert record(tmp_path)["status"] == "finished"


def test_a_handler_holding_the_loop_does_not_time_out_a_fast_client(tmp_path: Path) -> None:
    exp = _setup(tmp_path, client_timeout_s=1, comm_rounds=2)
    blocks = {"target": "hostile_handlers:Blocks", "kwargs": {"seconds": 3}}
    run = fedevents("run", str(exp), "--parallel", "2", *_with(blocks), cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    rec = record(tmp_path)
    assert rec["status"] == "finished" and "failures" not in rec


def test_systemexit_and_keyboardinterrupt_of_a_sink_are_its_failures(tmp_path: Path, reference: Path) -> None:
    exp = _setup(tmp_path)
    run = fedevents("run", str(exp), *_with({"target": "hostile_handlers:Exits"}), cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    failed = [line for line in run.stderr.splitlines() if "sink failed" in line]
    assert len(failed) == 2
    assert "handler=Exits" in failed[0] and "failed_event=RoundFinished" in failed[0] and "error=SystemExit: 3" in failed[0]
    assert "handler=Exits" in failed[1] and "failed_event=RoundStarted" in failed[1] and "error=KeyboardInterrupt" in failed[1]
    rec, ref = record(tmp_path), record(reference)
    assert rec["status"] == "finished"
    assert (rec["data"], rec["comm"]) == (ref["data"], ref["comm"])


@pytest.mark.anyio
@pytest.mark.parametrize(("raised", "reported"), [(SystemExit("bye"), r"SystemExit\(bye\)"),
                                                  (GeneratorExit("closing"), r"GeneratorExit\(closing\)")])
async def test_a_work_handler_raising_systemexit_fails_as_that_handler(raised: BaseException, reported: str) -> None:
    bus = EventBus()

    def quits(event) -> None:
        raise raised

    bus.subscribe(RoundStarted, quits, work=True)
    ev = RoundStarted(run_id="r", exp_name="e", seq=0, wall_time=0.0, mono_time=0.0, round=1)
    with pytest.raises(HandlerFailed, match=rf"^handler .*quits raised {reported}$"):
        await bus.emit(ev)


@pytest.mark.anyio
async def test_what_one_handler_receives_it_cannot_change_for_the_next() -> None:
    bus = EventBus()
    metrics = {"tr_acc": 0.5}
    attempts, seen = [], []

    def vandal(ev: TrainDone) -> None:
        for change in (lambda: operator.setitem(ev.metrics, "tr_acc", 1.0), lambda: ev.metrics.pop("tr_acc"),
                       lambda: setattr(ev, "samples", 0)):
            try:
                change()
            except (TypeError, AttributeError) as exc:
                attempts.append(type(exc).__name__)

    bus.subscribe(TrainDone, vandal, priority=1)
    bus.subscribe(TrainDone, lambda ev: seen.append((dict(ev.metrics), ev.samples)))
    ev = TrainDone(run_id="r", exp_name="e", seq=3, wall_time=1.0, mono_time=2.0, round=1, client="c0", task="t0",
                   device="cpu", slot=0, waited_s=0.0, ran_s=0.5, samples=8, metrics=metrics)
    metrics["tr_acc"] = 0.0  # nor can whoever built the event, afterwards
    await bus.emit(ev)
    assert attempts == ["TypeError", "AttributeError", "FrozenInstanceError"]
    assert seen == [({"tr_acc": 0.5}, 8)]
    assert isinstance(ev.metrics, MappingProxyType)
    assert to_dict(ev)["metrics"] == {"tr_acc": 0.5}


def test_sequences_become_tuples_and_the_json_form_is_unchanged() -> None:
    ev = ClientsSampled(run_id="r", exp_name="e", seq=1, wall_time=1.0, mono_time=2.0, round=1,
                        clients=["c0", "c1"], sample_seed=7)  # type: ignore[arg-type]
    assert ev.clients == ("c0", "c1")
    assert to_dict(ev) == {"event": "ClientsSampled", "schema": 1, "run_id": "r", "exp_name": "e", "seq": 1,
                           "wall_time": 1.0, "mono_time": 2.0, "round": 1, "clients": ["c0", "c1"],
                           "sample_seed": 7}


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no message")


#: What sinks raised that ended runs with a traceback (or, for the CancelledError, exit 0 and a `failed`
#: record), and how each is reported now: as the sink's failure, in one printable line.
RAISED = {
    "generator_exit": (lambda: GeneratorExit("closing"), "GeneratorExit: closing"),
    "base_exception_group": (lambda: BaseExceptionGroup("two", [SystemExit(4), ValueError("v")]),
                             "BaseExceptionGroup: two (2 sub-exceptions)"),
    "own_cancellation": pytest.param(lambda: asyncio.CancelledError("mine"), "CancelledError: mine", marks=[
        pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 cannot tell it from a real one")]),
    "lines_and_escapes": (lambda: RuntimeError("first\nsecond\x1b[31m"), "RuntimeError: first\\nsecond\\x1b[31m"),
    "unprintable": (lambda: _Unprintable(), "_Unprintable: (its message could not be read)"),
}


@pytest.mark.anyio
@pytest.mark.parametrize(("make", "reported"), RAISED.values(), ids=RAISED)
async def test_whatever_a_sink_raises_is_its_failure_reported_in_one_line(make, reported: str) -> None:
    bus, after = EventBus(), []

    async def raises(event) -> None:
        raise make()

    bus.subscribe(RoundStarted, raises, priority=1)
    bus.subscribe(RoundStarted, after.append)
    ev = RoundStarted(run_id="r", exp_name="e", seq=0, wall_time=0.0, mono_time=0.0, round=1)
    with capture_logs() as logs:
        await bus.emit(ev)
    assert after == [ev] and bus.sink_errors == 1
    [failed] = [log for log in logs if log["event"] == "sink failed"]
    assert failed["error"] == reported
    assert failed["error"].isprintable()


@pytest.mark.anyio
async def test_a_cancellation_of_the_run_still_passes_through_a_sink() -> None:
    """A sink's own CancelledError is its failure; the cancellation of the scope the run is in is not."""
    bus = EventBus()

    async def waits(event) -> None:
        await anyio.sleep_forever()

    bus.subscribe(RoundStarted, waits)
    ev = RoundStarted(run_id="r", exp_name="e", seq=0, wall_time=0.0, mono_time=0.0, round=1)
    with anyio.move_on_after(0.2) as scope:
        await bus.emit(ev)
    assert scope.cancelled_caught and bus.sink_errors == 0


def test_systemexit_from_a_task_a_sink_started_ends_the_run_in_one_line(tmp_path: Path) -> None:
    """Regression: asyncio lets a SystemExit out of its loop from any task, so the process exited with
    status 5 and no line, the record `failed`."""
    exp = _setup(tmp_path)
    run = fedevents("run", str(exp), *_with({"target": "hostile_handlers:TaskExits"}), cwd=tmp_path, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "fedevents: error: round 2: a task started by a handler raised SystemExit: 5, which ends the event loop "
        "itself: the run stopped there")
    assert record(tmp_path)["status"] == "failed"
