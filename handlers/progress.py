"""The live progress display of a run on a terminal, drawn with rich.

One block, redrawn four times a second below the log lines: the round out of the total with a bar, elapsed
time and an ETA from the rounds finished so far; the clients done out of those dispatched in the current
training and validation phases; and one line per device slot saying what it is doing, with the epoch of a
training when the client-work handler reports epochs (``ClientWork.on_epoch``). Log lines written through
``console_stream`` print above the block. Off a terminal the CLI does not attach it: the log sink's plain
lines are the whole output.

Events arrive on the event-loop thread and epochs from training threads, while rich redraws from its own
thread, so the state is kept under one lock and the drawing works on a copy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console, Group
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedevents.engine.bus import EventBus, Subscription
from fedevents.engine.events import (
    ClientDispatched,
    ClientFailed,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentInterrupted,
    ExperimentStarted,
    RoundFinished,
    RoundStarted,
    TrainDone,
    TrainStarted,
    ValDone,
    ValReused,
    ValScheduled,
    ValStarted,
)

from .logsink import SINK_PRIORITY

__all__ = ["LiveProgress"]

REFRESH_PER_SECOND = 4


@dataclass
class _Phase:
    """Clients of one phase of the current round: dispatched (or scheduled) and done."""

    sent: int = 0
    done: int = 0
    failed: int = 0


@dataclass
class _State:
    name: str = ""
    rounds: int = 0
    round: int | None = None
    started: float | None = None
    round_began: float | None = None
    round_seconds: list[float] = field(default_factory=list)  # rounds that trained, finished in this process
    last_finished: int | None = None
    train: _Phase = field(default_factory=_Phase)
    val: _Phase = field(default_factory=_Phase)
    val_left: dict[str, int] = field(default_factory=dict)  # tasks still to validate, per client
    slots: dict[tuple[str, int], str] = field(default_factory=dict)  # what each slot is doing
    clients: dict[str, tuple[str, int]] = field(default_factory=dict)  # the slot each busy client holds
    epochs: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)


class LiveProgress:
    """A rich live display of the run on ``stream`` (a terminal); ``console_stream`` prints above it."""

    def __init__(self, stream: IO[str], *, clock: Any = time.monotonic) -> None:
        self.console = Console(file=stream, force_terminal=True)
        self.console_stream: IO[str] = FileProxy(self.console, stream)  # type: ignore[assignment]
        self._clock = clock
        self._lock = threading.Lock()
        self._state = _State()
        self._live: Live | None = None
        self._subs: list[Subscription] = []

    def subscribe(self, bus: EventBus, *, priority: int = SINK_PRIORITY) -> list[Subscription]:
        handlers = {
            ExperimentStarted: self._on_started, RoundStarted: self._on_round_started,
            ClientDispatched: self._on_dispatched, TrainStarted: self._on_train_started,
            TrainDone: self._on_train_done, ValScheduled: self._on_val_scheduled, ValStarted: self._on_val_started,
            ValDone: self._on_val_done, ValReused: self._on_val_reused, ClientFailed: self._on_failed,
            RoundFinished: self._on_round_finished,
            ExperimentFinished: self._on_end, ExperimentFailed: self._on_end, ExperimentInterrupted: self._on_end,
        }
        subs = [bus.subscribe(kind, handler, priority=priority) for kind, handler in handlers.items()]
        self._subs += subs
        return subs

    def epoch(self, client: str, device: str, slot: int, done: int, total: int) -> None:
        """``ClientWork.on_epoch`` listener: ``done`` of ``total`` epochs of the training on (device, slot)."""
        with self._lock:
            self._state.epochs[(device, slot)] = (done, total)

    def close(self) -> None:
        """Stop drawing, leaving the last frame on the screen; safe to repeat."""
        for sub in self._subs:
            sub.unsubscribe()
        self._subs.clear()
        self._stop()

    def render(self) -> Group:
        """The block as it stands now."""
        with self._lock:
            s = _copy(self._state)
        now = self._clock()
        return Group(_header(s, now), *_phases(s), _slots(s))

    # --- events ------------------------------------------------------------------------------------------

    def _on_started(self, ev: ExperimentStarted) -> None:
        with self._lock:
            s = self._state
            s.name, s.rounds, s.started = ev.exp_name, ev.rounds, self._clock()
            s.last_finished = ev.first_round - 1 if ev.resumed else None
            s.slots = {(d, i): "idle" for d in ev.devices for i in range(ev.parallel)}
        if self._live is None:
            self._live = Live(get_renderable=self.render, console=self.console,
                              refresh_per_second=REFRESH_PER_SECOND, transient=False, redirect_stdout=False,
                              redirect_stderr=False)
            self._live.start()

    def _on_round_started(self, ev: RoundStarted) -> None:
        with self._lock:
            s = self._state
            s.round, s.round_began = ev.round, self._clock()
            s.train, s.val, s.val_left = _Phase(), _Phase(), {}

    def _on_dispatched(self, ev: ClientDispatched) -> None:
        with self._lock:
            self._state.train.sent += 1

    def _on_train_started(self, ev: TrainStarted) -> None:
        with self._lock:
            self._take(ev.client, ev.device, ev.slot, f"training {ev.client} on {ev.task}")

    def _on_train_done(self, ev: TrainDone) -> None:
        with self._lock:
            self._state.train.done += 1
            self._free(ev.client)

    def _on_val_scheduled(self, ev: ValScheduled) -> None:
        with self._lock:
            self._state.val.sent += 1
            self._state.val_left[ev.client] = len(ev.tasks)

    def _on_val_started(self, ev: ValStarted) -> None:
        with self._lock:
            self._take(ev.client, ev.device, ev.slot, f"validating {ev.client}")

    def _on_val_done(self, ev: ValDone) -> None:
        with self._lock:
            s = self._state
            left = s.val_left.get(ev.client, 1) - 1
            s.val_left[ev.client] = left
            if left <= 0:
                s.val.done += 1
                self._free(ev.client)

    def _on_val_reused(self, ev: ValReused) -> None:
        with self._lock:  # clients that keep their scores count as validated at once
            self._state.val.sent += len(ev.clients)
            self._state.val.done += len(ev.clients)

    def _on_failed(self, ev: ClientFailed) -> None:
        with self._lock:
            phase = self._state.val if ev.phase == "validate" else self._state.train
            phase.done += 1
            phase.failed += 1
            self._free(ev.client)

    def _on_round_finished(self, ev: RoundFinished) -> None:
        with self._lock:
            s = self._state
            if s.round_began is not None and ev.trained + ev.failed > 0:
                s.round_seconds.append(self._clock() - s.round_began)
            s.last_finished = ev.round

    def _on_end(self, ev: Any) -> None:
        self._stop()

    def _take(self, client: str, device: str, slot: int, doing: str) -> None:
        self._state.slots[(device, slot)] = doing
        self._state.clients[client] = (device, slot)
        self._state.epochs.pop((device, slot), None)

    def _free(self, client: str) -> None:
        where = self._state.clients.pop(client, None)
        if where is not None:
            self._state.slots[where] = "idle"
            self._state.epochs.pop(where, None)

    def _stop(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None


def _copy(s: _State) -> _State:
    return _State(name=s.name, rounds=s.rounds, round=s.round, started=s.started, round_began=s.round_began,
                  round_seconds=list(s.round_seconds), last_finished=s.last_finished,
                  train=_Phase(s.train.sent, s.train.done, s.train.failed),
                  val=_Phase(s.val.sent, s.val.done, s.val.failed), slots=dict(s.slots), epochs=dict(s.epochs))


def _header(s: _State, now: float) -> Table:
    done = 0 if s.last_finished is None else s.last_finished
    grid = Table.grid(padding=(0, 2))
    grid.add_row(
        Text(f"{s.name}  round {'-' if s.round is None else s.round}/{s.rounds}", style="bold"),
        ProgressBar(total=max(s.rounds, 1), completed=min(done, s.rounds), width=30),
        Text(f"elapsed {_clock_text(now - s.started) if s.started is not None else '-'}"),
        Text(f"ETA {_eta(s)}"),
    )
    return grid


def _eta(s: _State) -> str:
    if not s.round_seconds or s.last_finished is None:
        return "-"
    per_round = sum(s.round_seconds) / len(s.round_seconds)
    return _clock_text(per_round * max(s.rounds - s.last_finished, 0))


def _phases(s: _State) -> list[Text]:
    lines = []
    for name, phase in (("train", s.train), ("validate", s.val)):
        if phase.sent:
            failed = f", {phase.failed} failed" if phase.failed else ""
            lines.append(Text(f"  {name:<9}{phase.done}/{phase.sent} clients done{failed}"))
    return lines


def _slots(s: _State) -> Table:
    grid = Table.grid(padding=(0, 2))
    for (device, slot), doing in sorted(s.slots.items()):
        epoch = s.epochs.get((device, slot))
        grid.add_row(Text(f"  {device} slot {slot}", style="cyan"), Text(doing, style="dim" if doing == "idle" else ""),
                     Text(f"epoch {epoch[0]}/{epoch[1]}" if epoch else ""))
    return grid


def _clock_text(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
