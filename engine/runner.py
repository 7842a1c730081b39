"""The run loop: walks an experiment by emitting events and awaiting their handlers.

Round 0 validates every client (when ``val_clients`` is ``all``). Each later round: sample the online
clients, dispatch each one (integrated state to a new client, incremental to a known one) and let the train
work handler train and upload it, validate every ``val_interval`` rounds and in the last round, close the
uploads so the aggregate work handler combines them, finish the round. A validation round scores only the
clients whose scores may have changed since they were last scored (``ScoreLedger``); the others keep theirs,
named by one ValReused event. The engine owns the sampling generator; everything with torch happens in
handlers.
"""

from __future__ import annotations

import hashlib
import random
import time
import traceback
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import anyio
from structlog.contextvars import bound_contextvars

from .bus import EventBus
from .config import ExperimentConfig
from .context import RunContext
from .errors import ConfigError, FedEventsError, Interrupted, OutputError, RunFailed, describe, message
from .events import (
    CheckpointSaved,
    ClientDispatched,
    ClientFailed,
    ClientsSampled,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentInterrupted,
    ExperimentStarted,
    GlobalValScheduled,
    RoundFinished,
    RoundStarted,
    UploadsClosed,
    ValDone,
    ValReused,
    ValScheduled,
)
from .reuse import ScoreLedger

__all__ = ["Engine", "STOP_GRACE_S", "due", "online_clients", "sample_seed", "scores_idle_clients", "task_index"]

#: After a signal, how long the run may take to reach a point where it stops by itself (the end of the
#: handler it is in) before whatever it is awaiting is cancelled: a hung async handler cannot hold it.
STOP_GRACE_S = 5.0


def sample_seed(seed: int, round: int) -> int:
    """The seed of round ``round``'s client sampling: stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}/sample/{round}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def online_clients(config: ExperimentConfig, round: int) -> tuple[str, ...]:
    """The clients round ``round`` samples, in client order: a function of the seed, the round and the
    client list alone, so a checkpoint can tell which clients the next round dispatches to."""
    picked = sorted(random.Random(sample_seed(config.seed, round)).sample(range(len(config.clients)),
                                                                           config.online_clients))
    return tuple(config.clients.names[i] for i in picked)


def due(round: int, interval: int, last: int) -> bool:
    """Whether a thing done every ``interval`` rounds (validation, checkpoints) is done in ``round``: round 0
    counts as a multiple, and the last round always does it."""
    return round % interval == 0 or round == last


def scores_idle_clients(config: ExperimentConfig) -> bool:
    """Whether a validation round scores clients that did not train in it, with the state they stored
    before (``val_model`` local or both, ``val_clients: all``). Otherwise a client's stored state is read
    only at its own dispatch and, once it has trained, by that round's validation: a checkpoint may then
    leave out whatever the client's next dispatch overwrites, however many rounds away that is."""
    opts = config.data["exp_opts"]
    return opts["val_model"] in ("local", "both") and opts["val_clients"] == "all"


def task_index(participations: int, sustain_rounds: int, n_tasks: int) -> int:
    """Which of a client's tasks it trains after ``participations`` earlier rounds: it stays
    ``sustain_rounds`` participations on each task, then moves on, and stays on the last one."""
    return min(participations // sustain_rounds, n_tasks - 1)


@dataclass
class _Phase:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    first_error: RunFailed | None = None


class Engine:
    """Runs one experiment's rounds on a bus; work handlers must be subscribed before ``run``.

    ``resume_round`` and ``participations`` continue a run from a checkpoint taken after that round.
    ``reuse_scores`` False scores every client in every validation round even with ``exp_opts.val_reuse``
    (for a method whose scores read more than a client's stored state). ``ledger`` is the ledger of kept
    scores to use (a resumed run's, loaded from its checkpoint); a new one by default.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        bus: EventBus,
        context: RunContext,
        *,
        dry_run: bool = False,
        max_in_flight: int = 64,
        resume_round: int | None = None,
        participations: Mapping[str, int] | None = None,
        reuse_scores: bool = True,
        ledger: ScoreLedger | None = None,
    ) -> None:
        self.config = config
        self.bus = bus
        self.context = context
        self.dry_run = dry_run
        self.max_in_flight = max_in_flight
        self.resume_round = resume_round
        self.participations: dict[str, int] = dict(participations or {})
        self.round = 0
        self.last_checkpoint = -1 if resume_round is None else resume_round
        self._stop: str | None = None
        self._finish: str = ""
        self._phase_scope: anyio.CancelScope | None = None
        self._run_scope: anyio.CancelScope | None = None
        self._tolerate = config.data["exp_opts"]["failure_policy"] == "tolerate"
        val_model = config.data["exp_opts"]["val_model"]
        self._val_local = val_model in ("local", "both")
        self._val_global = val_model in ("global", "both")
        self.ledger = ledger if ledger is not None else ScoreLedger()
        self.ledger.enabled = reuse_scores and bool(config.data["exp_opts"].get("val_reuse", True))

    def stop(self, signal_name: str) -> None:
        """Stop soon (a signal arrived): dispatch nothing more, cancel the running phase, end the run."""
        if self._stop is None:
            self._stop = signal_name
            if self._phase_scope is not None:
                self._phase_scope.cancel()
            if self._run_scope is not None:  # whatever still runs then (a hung handler) is cancelled
                self._run_scope.deadline = min(self._run_scope.deadline, anyio.current_time() + STOP_GRACE_S)

    def finish_after_round(self, reason: str) -> None:
        """End the run well after the current round (a handler's decision, e.g. early stopping): the round
        finishes and is checkpointed, no later round starts, and ExperimentFinished says ``reason``."""
        if not reason:
            raise ValueError("finish_after_round: expected a reason, found an empty string")
        if not self._finish:
            self._finish = reason

    async def emit(self, event_type: type, **fields: object) -> None:
        await self.bus.emit(self.context.make(event_type, **fields))

    def first_round(self) -> int:
        if self.resume_round is not None:
            return self.resume_round + 1
        return 0 if self.config.data["exp_opts"]["val_clients"] == "all" else 1

    async def run(self) -> None:
        """Run every round; on failure emit ExperimentFailed and raise RunFailed (Interrupted on a signal)."""
        needs = (ClientDispatched, ValScheduled, UploadsClosed) + ((GlobalValScheduled,) if self._val_global else ())
        for needed in needs:
            if not self.bus.has_work_handler(needed):
                raise ConfigError(f"no work handler is subscribed to {needed.__name__}; nothing would train")
        cfg = self.config
        started = time.monotonic()
        first = self.first_round()
        self.round = first  # a failure before the first round names the round the run was to start with
        watch = self.bus.subscribe(CheckpointSaved, self._checkpointed)
        scores = self.bus.subscribe(ValDone, self._scored)
        try:
            with anyio.CancelScope() as self._run_scope:
                await self._rounds(first)
            if self._run_scope.cancelled_caught:  # the grace after a signal ran out
                self._check_stop()
            self._run_scope = None
            for settle in self.context.settle:
                await settle()
        except Interrupted as exc:
            await self._settle_quietly()
            await self._last_word(ExperimentInterrupted, round=self.round, signal=exc.signal_name,
                                  last_checkpoint=self.last_checkpoint)
            # Named again: a checkpoint still being written when the signal came is the one to resume from.
            raise Interrupted(exc.signal_name, self.round, self.last_checkpoint) from None
        except RunFailed as exc:
            await self._settle_quietly()
            cause = _format(exc.__cause__) if exc.__cause__ is not None else ""
            await self._last_word(ExperimentFailed, round=self.round, reason=str(exc), error_type="RunFailed",
                                  traceback=cause)
            raise
        except BaseException as exc:
            await self._settle_quietly()
            await self._last_word(ExperimentFailed, round=self.round, reason=describe(exc),
                                  error_type=type(exc).__name__, traceback=_format(exc))
            raise
        finally:
            watch.unsubscribe()
            scores.unsubscribe()
        rounds = self.round if self._finish else cfg.rounds
        await self.emit(ExperimentFinished, rounds=rounds, seconds=time.monotonic() - started, stopped=self._finish)

    async def _rounds(self, first: int) -> None:
        cfg = self.config
        await self.emit(
            ExperimentStarted,
            method=cfg.method,
            rounds=cfg.rounds,
            clients=len(cfg.clients),
            online_clients=cfg.online_clients,
            devices=cfg.devices,
            parallel=cfg.parallel,
            seed=cfg.seed,
            dry_run=self.dry_run,
            first_round=first,
            resumed=self.resume_round is not None,
        )
        if first == 0:
            await self._round_zero()
        for rnd in range(max(first, 1), cfg.rounds + 1):
            self._check_stop()
            await self._round(rnd)
            if self._finish:
                break

    async def _last_word(self, event_type: type, **fields: object) -> None:
        """Emit the run's final event whatever happens around it, for at most ``STOP_GRACE_S`` (a hung
        handler of it is cancelled then); a file that cannot be written then was reported already."""
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + STOP_GRACE_S
            try:
                await self.emit(event_type, **fields)
            except OutputError:
                pass

    async def _settle_quietly(self) -> None:
        """Let work still going on land before a failed or stopped run's last word, for at most
        ``STOP_GRACE_S``; its own failure adds nothing to the one being reported."""
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + STOP_GRACE_S
            for settle in self.context.settle:
                try:
                    await settle()
                except Exception:
                    pass

    def _checkpointed(self, ev: CheckpointSaved) -> None:
        self.last_checkpoint = ev.round

    def _scored(self, ev: ValDone) -> None:
        self.ledger.score(ev.client, ev.task, ev.metrics)

    def _check_stop(self) -> None:
        if self.bus.output_error is not None:  # a run whose files cannot be written must not go on
            raise self.bus.output_error
        if self._stop is not None:
            raise Interrupted(self._stop, self.round, self.last_checkpoint)

    async def _round_zero(self) -> None:
        self.round = 0
        started = time.monotonic()
        await self.emit(RoundStarted, round=0)
        validated, reused = await self._validate(0, self.config.clients.names) if self._val_local else (0, 0)
        await self._validate_global(0)
        await self._finish_round(0, 0, 0, validated, reused, started)

    async def _finish_round(self, rnd: int, trained: int, failed: int, validated: int, reused: int,
                            started: float) -> None:
        try:
            await self.emit(RoundFinished, round=rnd, trained=trained, failed=failed, validated=validated,
                            seconds=time.monotonic() - started, reused=reused)
        except OutputError:  # a sink could not write the round: its checkpoint was not saved
            raise
        except Exception as exc:  # a work handler of RoundFinished (the checkpoint) failed
            reason = str(exc) if isinstance(exc, FedEventsError) else describe(exc)
            raise RunFailed(f"round {rnd}: {reason}") from exc

    async def _round(self, rnd: int) -> None:
        cfg = self.config
        self.round = rnd
        started = time.monotonic()
        await self.emit(RoundStarted, round=rnd)
        online = online_clients(cfg, rnd)
        await self.emit(ClientsSampled, round=rnd, clients=online, sample_seed=sample_seed(cfg.seed, rnd))

        train = await self._phase(rnd, online, self._train_one)
        # Sampled order, not completion order: aggregation must not depend on thread timing.
        trained = set(train.done)
        uploaded = tuple(c for c in online if c in trained)
        least = cfg.data["exp_opts"]["min_clients"]
        if len(uploaded) < least:
            raise RunFailed(f"round {rnd}: {len(uploaded)} of {len(online)} clients trained, fewer than "
                            f"exp_opts.min_clients = {least}")
        validated = reused = 0
        validating = due(rnd, cfg.val_interval, cfg.rounds)
        if validating and self._val_local:
            scope = cfg.clients.names if cfg.data["exp_opts"]["val_clients"] == "all" else uploaded
            validated, reused = await self._validate(rnd, scope)
        self.ledger.aggregated()  # from here on the global model may differ
        try:
            await self.emit(UploadsClosed, round=rnd, clients=uploaded)
        except OutputError:
            raise
        except Exception as exc:
            raise RunFailed(f"round {rnd}: aggregation failed: {describe(exc)}") from exc
        self._check_stop()
        if validating:
            await self._validate_global(rnd)
        await self._finish_round(rnd, len(train.done), len(train.failed), validated, reused, started)

    async def _validate_global(self, rnd: int) -> None:
        """Score the aggregated model on every task's server-side test set (``exp_opts.val_model``)."""
        if not self._val_global:
            return
        try:
            await self.emit(GlobalValScheduled, round=rnd, tasks=self.config.clients.all_tasks())
        except Exception as exc:
            raise RunFailed(f"round {rnd}: validating the global model failed: {describe(exc)}") from exc
        self._check_stop()

    async def _validate(self, rnd: int, clients: Sequence[str]) -> tuple[int, int]:
        """Score ``clients`` whose scores may have changed, and name the others in one ValReused; give how
        many have scores for the round and how many of them were kept."""
        score, keep = self.ledger.split(clients)
        if keep:
            scored_in, scores = self.ledger.reused(keep)
            await self.emit(ValReused, round=rnd, clients=tuple(keep), scored_in=scored_in, scores=scores)
        phase = await self._phase(rnd, score, self._validate_one)
        return len(phase.done) + len(keep), len(keep)

    async def _phase(self, rnd: int, clients: Sequence[str], work) -> _Phase:
        """Run ``work`` for every client, at most ``max_in_flight`` at once, in client order."""
        phase = _Phase()
        queue: Iterator[str] = iter(clients)
        self._check_stop()
        async with anyio.create_task_group() as tg:
            self._phase_scope = tg.cancel_scope

            async def worker() -> None:
                for client in queue:
                    await work(rnd, client, phase, tg.cancel_scope)

            for _ in range(min(self.max_in_flight, len(clients))):
                tg.start_soon(worker)
        self._phase_scope = None
        self._check_stop()
        if phase.first_error is not None:
            raise phase.first_error
        return phase

    async def _train_one(self, rnd: int, client: str, phase: _Phase, scope: anyio.CancelScope) -> None:
        tasks = self.config.clients.tasks(client)
        done_before = self.participations.get(client, 0)
        task = tasks[task_index(done_before, self.config.sustain_rounds, len(tasks))]
        state = "incremental" if client in self.participations else "integrated"
        self.participations[client] = done_before + 1
        self.ledger.dispatched(client)
        with bound_contextvars(round=rnd, client=client, task=task):
            try:
                await self.emit(ClientDispatched, round=rnd, client=client, task=task, state=state)
            except Exception as exc:
                await self._client_failed(rnd, client, task, "train", exc, phase, scope)
            else:
                self.ledger.trained(client)
                phase.done.append(client)

    async def _validate_one(self, rnd: int, client: str, phase: _Phase, scope: anyio.CancelScope) -> None:
        tasks = self.config.clients.tasks(client)
        with bound_contextvars(round=rnd, client=client):
            try:
                await self.emit(ValScheduled, round=rnd, client=client, tasks=tasks)
            except Exception as exc:
                self.ledger.failed(client)
                await self._client_failed(rnd, client, ",".join(tasks), "validate", exc, phase, scope)
            else:
                self.ledger.scored(client, rnd)
                phase.done.append(client)

    async def _client_failed(self, rnd: int, client: str, task: str, phase_name: str, exc: Exception,
                             phase: _Phase, scope: anyio.CancelScope) -> None:
        if self.bus.output_error is not None:  # not the client's fault: the run's files cannot be written
            scope.cancel()
            return
        phase.failed.append(client)
        with anyio.CancelScope(shield=True):
            try:
                await self.emit(ClientFailed, round=rnd, client=client, task=task, phase=phase_name,
                                error_type=type(exc).__name__, error=message(exc), traceback=_format(exc))
            except OutputError:
                scope.cancel()
                return
        if phase.first_error is None and not self._tolerate:
            verb = "training" if phase_name == "train" else "validating"
            phase.first_error = RunFailed(
                f"client {client} failed in round {rnd} while {verb}: {describe(exc)}"
            )
            phase.first_error.__cause__ = exc
            scope.cancel()  # failure policy 'fail': stop the rest of the phase


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
