"""An experiment ready to run: its config, bus, device pool, run context and attached components."""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import anyio

from .bus import EventBus
from .config import ExperimentConfig
from .context import RunContext, new_run_id
from .devices import DevicePool
from .errors import ConfigError, FedEventsError, RunFailed, describe
from .results import ResultTracker, RunResult
from .reuse import ScoreLedger
from .runner import STOP_GRACE_S, Engine

__all__ = ["Experiment", "ResumePoint", "RunPaths", "ABANDON_AFTER_S"]

#: After one signal, how long the run may take to stop on its own (a hung handler is cancelled after
#: ``STOP_GRACE_S``, the final event gets as long again) before the process ends without it: a sync handler
#: that never returns holds the event loop itself, and only this watchdog thread can still act.
ABANDON_AFTER_S = 3 * STOP_GRACE_S


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: after ``round``, with each client's earlier participations."""

    round: int
    participations: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPaths:
    """Where one run writes: all files share the run id as their stem inside ``logs_dir``."""

    logs_dir: Path
    run_id: str

    def _file(self, suffix: str) -> Path:
        return self.logs_dir / f"{self.run_id}{suffix}"

    @property
    def record(self) -> Path:
        return self._file(".json")

    @property
    def log(self) -> Path:
        return self._file(".log.jsonl")

    @property
    def events(self) -> Path:
        return self._file(".events.jsonl")

    @property
    def trace(self) -> Path:
        return self._file(".trace.json")


class Experiment:
    """Subscribe handlers on ``bus`` (or ``add`` components), then ``run()``.

    ``resume`` continues a checkpointed run after its round; components that restore their own state from
    the checkpoint (the federation, the checkpointer) are given it by whoever builds the experiment.
    """

    def __init__(self, config: ExperimentConfig, *, dry_run: bool = False, run_id: str | None = None,
                 resume: ResumePoint | None = None, devices: Sequence[str] | None = None,
                 max_in_flight: int = 64) -> None:
        self.config = config
        self.dry_run = dry_run
        self.resume = resume
        self.bus = EventBus()
        self.bus.time_limit_s = config.data.get("exp_opts", {}).get("handler_timeout_s")
        # ``devices`` replaces the config's list when an executor discovers them (the nodes of a cluster).
        self.pool = DevicePool(tuple(devices) if devices else config.devices, config.parallel)
        self.paths = RunPaths(config.logs_dir, run_id or _unused_run_id(config))
        self.context = RunContext(self.paths.run_id, config.exp_name)
        self.max_in_flight = max_in_flight
        self.components: list[Any] = []
        #: What steering handlers may do to this run (set by ``provide_control``); None until then.
        self.control: Any = None
        #: Whether validation may keep the scores of clients whose stored state has not changed (with
        #: ``exp_opts.val_reuse``); whoever builds the experiment clears it for a method that does not allow it.
        self.reuse_scores = True
        #: The ledger of kept validation scores; its ``state_dict()`` travels with checkpoints.
        self.scores = ScoreLedger()
        self.engine: Engine | None = None
        self._closers: list[Callable[[], None]] = []
        self._abandoners: list[Callable[[str, int], None]] = []
        self._settlers: list[Callable[[float], int | None]] = []
        self._results = ResultTracker()
        self._results.subscribe(self.bus)
        #: Whether fedevents handles SIGINT itself in this run, so that a KeyboardInterrupt is never a Ctrl-C.
        self._own_signals = False

    @property
    def finished(self) -> bool:
        """Whether a resumed run had already finished every round and its record says so: running it then
        does nothing. A record its run could not finish writing (a full disk) is completed instead."""
        return (self.resume is not None and self.resume.round >= self.config.rounds
                and _record_status(self.paths.record) == "finished")

    def add(self, component: Any) -> Any:
        """Attach a component with ``subscribe(bus)`` (and, optionally, ``close()``, called after the run,
        ``bind(control)``, called with the run's control so that it may steer the run, and
        ``abandon(signal_name, last_checkpoint)``, called from another thread when a signalled run cannot stop on its own, after
        ``settle_now(timeout)``, which finishes work in flight there and gives the round of a checkpoint it
        completed, or None)."""
        component.subscribe(self.bus)
        self.components.append(component)
        close = getattr(component, "close", None)
        if callable(close):
            self.on_close(close)
        abandon = getattr(component, "abandon", None)
        if callable(abandon):
            self._abandoners.append(abandon)
        settle_now = getattr(component, "settle_now", None)
        if callable(settle_now):
            self._settlers.append(settle_now)
        self._bind(component)
        return component

    def provide_control(self, control: Any) -> None:
        """Give steering handlers ``control``: each attached component with ``bind`` gets it, now or when added."""
        self.control = control
        for component in self.components:
            self._bind(component)

    def _bind(self, component: Any) -> None:
        bind = getattr(component, "bind", None)
        if self.control is not None and component is not self.control and callable(bind):
            bind(self.control)

    def component(self, kind: type) -> Any:
        """The first attached component that is a ``kind``, or None."""
        return next((c for c in self.components if isinstance(c, kind)), None)

    def finish_after_round(self, reason: str) -> None:
        """End the run well after the round now running (status ``stopped``, exit status 0, the record
        complete); for handlers that decide a run has done enough, such as early stopping."""
        if self.engine is None:
            raise RuntimeError("finish_after_round: expected a running experiment, found none running")
        self.engine.finish_after_round(reason)

    def on_close(self, close: Callable[[], None]) -> None:
        """Call ``close()`` after the run, on every exit path, in the reverse order of registration."""
        self._closers.append(close)

    def run(self, *, backend: str = "asyncio", handle_signals: bool = True) -> RunResult:
        """Run the experiment to the end in a new event loop (``"asyncio"`` or ``"trio"``).

        With ``handle_signals`` (in the main thread), SIGINT or SIGTERM stops the run cleanly: nothing more
        is dispatched, the record is marked interrupted and ``Interrupted`` is raised; a second signal ends
        the process at once.
        """
        self._own_signals = handle_signals and threading.current_thread() is threading.main_thread()
        try:
            return anyio.run(partial(self.run_async, handle_signals=handle_signals), backend=backend)
        except (SystemExit, KeyboardInterrupt) as exc:
            if isinstance(exc, KeyboardInterrupt) and not self._own_signals:
                raise  # without fedevents' signal handling it may be the user's Ctrl-C
            # asyncio lets these two out of its loop from any task, past the handler that started the task,
            # so the bus could not report them as that handler's failure.
            round_ = self.engine.round if self.engine is not None else 0
            raise RunFailed(f"round {round_}: a task started by a handler raised {describe(exc)}, which ends the "
                            "event loop itself: the run stopped there") from None

    async def run_async(self, *, handle_signals: bool = False) -> RunResult:
        """Run inside an existing event loop; components are closed on every exit path.

        Gives the run's result (status, record path, metrics per round); a failed run raises RunFailed, an
        interrupted one Interrupted.
        """
        if self.finished:
            return self._results.result(self.paths.run_id, self.paths.record)
        watchdog: _Watchdog | None = None
        try:
            _check_writable(self.config.logs_dir, self.config.source)
            resume = self.resume
            self.engine = Engine(self.config, self.bus, self.context, dry_run=self.dry_run,
                                 max_in_flight=self.max_in_flight,
                                 resume_round=None if resume is None else resume.round,
                                 participations=None if resume is None else resume.participations,
                                 reuse_scores=self.reuse_scores, ledger=self.scores)
            if handle_signals and threading.current_thread() is threading.main_thread():
                watchdog = _Watchdog(self.engine, self._settlers, self._abandoners)
                await _run_with_signals(self.engine, watchdog)
            else:
                await self.engine.run()
        except BaseException:
            self._close()  # the run's own error is the one to report; closing errors would only echo it
            raise
        finally:
            if watchdog is not None:
                watchdog.disarm()
        failed = self._close()
        if failed is not None:
            raise failed
        return self._results.result(self.paths.run_id, self.paths.record)

    def _close(self) -> FedEventsError | None:
        """Call every closer, even after one fails; give the first failure as a one-line error."""
        first: FedEventsError | None = None
        for close in reversed(self._closers):
            try:
                close()
            except BaseException as exc:  # a handler's close raising SystemExit has failed, like any other
                if isinstance(exc, KeyboardInterrupt) and not self._own_signals:
                    raise  # without fedevents' signal handling it may be the user's Ctrl-C
                if first is None:
                    first = exc if isinstance(exc, FedEventsError) else RunFailed(
                        f"closing the run failed: {describe(exc)}")
        self._closers.clear()
        return first


class _Watchdog:
    """Ends the process if a signalled run has not stopped ``ABANDON_AFTER_S`` later.

    Armed from the Python-level signal handler, which runs in the main thread between bytecodes even while
    a sync handler holds the event loop; the wait runs in a thread of its own. It tells the components
    (the record is marked interrupted) and exits with the signal's status.
    """

    def __init__(self, engine: Engine, settlers: Sequence[Callable[[float], int | None]],
                 abandoners: Sequence[Callable[[str, int], None]]) -> None:
        self.engine = engine
        self.settlers = settlers
        self.abandoners = abandoners
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self, signum: int) -> None:
        if self._thread is None and not self._done.is_set():
            self._thread = threading.Thread(target=self._wait, args=(signum,), name="fedevents-stop", daemon=True)
            self._thread.start()

    def disarm(self) -> None:
        self._done.set()

    def chain(self, sig: int) -> None:
        """Arm on ``sig`` before calling the handler the event loop installed for it."""
        installed = signal.getsignal(sig)

        def handler(signum: int, frame: Any) -> None:
            self.arm(signum)
            if callable(installed):
                installed(signum, frame)

        signal.signal(sig, handler)

    def _wait(self, signum: int) -> None:
        if self._done.wait(ABANDON_AFTER_S):
            return
        name = signal.Signals(signum).name
        checkpoint = self.engine.last_checkpoint
        for settle_now in self.settlers:  # a checkpoint being written when the loop stopped is the one to resume from
            try:
                written = settle_now(ABANDON_AFTER_S)
            except Exception:  # noqa: BLE001 - the older checkpoint is still whole
                written = None
            if written is not None:
                checkpoint = max(checkpoint, written)
        for abandon in self.abandoners:
            try:
                abandon(name, checkpoint)
            except Exception:  # noqa: BLE001 - exiting anyway: one component's failure must not keep the others
                pass
        os.write(2, (f"fedevents: interrupted: interrupted by {name} in round {self.engine.round}; a handler held "
                     f"the event loop for {ABANDON_AFTER_S:g}s after the signal, so the run ended without its last "
                     f"events; resume from round {checkpoint} with --resume\n").encode())
        os._exit(128 + signum)


async def _run_with_signals(engine: Engine, watchdog: _Watchdog) -> None:
    failure: list[Exception] = []
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    try:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                with anyio.open_signal_receiver(*_SIGNALS) as received:
                    for sig in _SIGNALS:
                        watchdog.chain(sig)
                    async for signum in received:
                        engine.stop(signal.Signals(signum).name)
                        break
                # Leaving the receiver put the old handlers back; from now on a second signal ends at once.
                for sig in _SIGNALS:
                    signal.signal(sig, _exit_now)

            async def main() -> None:
                try:
                    await engine.run()
                except Exception as exc:  # kept out of the task group's exception group
                    failure.append(exc)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            tg.start_soon(main)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_now(signum: int, frame: object) -> None:
    # Every file fedevents writes is replaced atomically, so ending here loses no finished output.
    os.write(2, f"fedevents: {signal.Signals(signum).name} again; exiting now\n".encode())
    os._exit(128 + signum)


def _record_status(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _unused_run_id(config: ExperimentConfig) -> str:
    while True:
        run_id = new_run_id(config.exp_name)
        if not (config.logs_dir / f"{run_id}.json").exists():
            return run_id


def _check_writable(logs_dir: Path, source: str) -> None:
    try:
        logs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{source}: logs_dir: expected a writable directory, found {logs_dir} ({exc.strerror})") from None
    if not os.access(logs_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"{source}: logs_dir: expected a writable directory, found {logs_dir} is not writable")
