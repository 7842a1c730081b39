"""The dry run's executor: every job is given a modelled duration on a virtual clock instead of running.

With ``SimulatedFederation`` as the driver, the client-work handler emits exactly the events of a real run
(it takes real device-pool slots) but nothing trains. Each job lasts batches × ``dry_run_opts.*_s_per_batch``
on the clock of its slot; the round's phases are barriers, as in a real run. The largest clock at the end
is the predicted makespan.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fedevents.engine.bus import EventBus, Subscription
from fedevents.engine.context import RunContext
from fedevents.engine.devices import Slot
from fedevents.engine.events import CheckpointSaved, RoundFinished
from fedevents.engine.runner import due

from .base import Executor

__all__ = ["DryRunCheckpoints", "SimulatedExecutor", "SimulatedFederation"]


@dataclass(frozen=True, slots=True)
class _Job:
    round: int
    tasks: tuple[str, ...]
    on_server: bool = False  # the global model on the server's test set


@dataclass(frozen=True, slots=True)
class _Result:
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class _Aggregate:
    clients: tuple[str, ...]
    samples: int


class SimulatedFederation:
    """The dry run's driver: jobs without payloads, results without training, the sample counts a real
    run would report."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        synth = config["task_opts"]["synthetic"]
        self.train_samples = synth["samples_per_client"]
        self.val_samples = synth["test_size"]

    def train_job(self, *, client: str, task: str, round: int, device: str, state: str) -> _Job:
        return _Job(round, (task,))

    def commit(self, client: str, outcome: _Result) -> _Result:
        return outcome

    def upload(self, *, client: str, round: int) -> _Result:
        return _Result(self.train_samples)

    def val_job(self, *, client: str, tasks: Sequence[str], round: int, device: str) -> _Job:
        return _Job(round, tuple(tasks))

    def global_val_job(self, *, tasks: Sequence[str], round: int, device: str) -> _Job:
        return _Job(round, tuple(tasks), on_server=True)

    def aggregate(self, *, round: int, clients: Sequence[str]) -> _Aggregate:
        return _Aggregate(tuple(clients), self.train_samples * len(clients))


class SimulatedExecutor(Executor):
    """Places each job on its slot's virtual clock; ``summary()`` reports the modelled schedule."""

    name = "simulated"
    inline = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        task_opts = config["task_opts"]
        synth = task_opts["synthetic"]
        costs = config["dry_run_opts"]
        self.train_samples = synth["samples_per_client"]
        self.val_samples = synth["test_size"]
        self.global_samples = synth["global_test_size"]
        batches = math.ceil(self.train_samples / task_opts["batch_size"]) * task_opts["train_epochs"]
        self.train_s = batches * costs["train_s_per_batch"]
        self.val_s_per_task = math.ceil(self.val_samples / task_opts["batch_size"]) * costs["val_s_per_batch"]
        self.per_slot: Counter[tuple[str, int]] = Counter()
        self._free_at: dict[tuple[str, int], float] = {}
        self._phase_start = 0.0
        self._phase_key: tuple[int, str] = (-1, "")

    def train(self, job: _Job, slot: Slot) -> _Result:
        self._place(slot, (job.round, "train"), self.train_s)
        return _Result(self.train_samples)

    def validate(self, job: _Job, slot: Slot) -> dict[str, _Result]:
        samples = self.global_samples if job.on_server else self.val_samples
        batches = math.ceil(samples / self.val_samples) if job.on_server else 1
        self._place(slot, (job.round, "global" if job.on_server else "validate"),
                    self.val_s_per_task * batches * len(job.tasks))
        return {task: _Result(samples) for task in job.tasks}

    def _place(self, slot: Slot, phase: tuple[int, str], seconds: float) -> None:
        if phase != self._phase_key:  # a new phase starts when every slot is done with the last one
            self._phase_key = phase
            self._phase_start = max(self._free_at.values(), default=self._phase_start)
        where = (slot.device, slot.index)
        self._free_at[where] = max(self._free_at.get(where, 0.0), self._phase_start) + seconds
        self.per_slot[where] += 1

    def summary(self) -> dict[str, Any]:
        """Work items per device slot and the predicted makespan in seconds."""
        return {
            "per_slot": {f"{d}/slot{i}": n for (d, i), n in sorted(self.per_slot.items())},
            "predicted_makespan_s": max(self._free_at.values(), default=0.0),
            "train_s_each": self.train_s,
            "val_s_per_task": self.val_s_per_task,
        }


class DryRunCheckpoints:
    """Says when a real run would announce a checkpoint (CheckpointSaved with nothing written), so the dry
    run's event sequence equals the real run's: a round's checkpoint at the end of the next round (a real
    one is written meanwhile), the last one before the run's last event."""

    def __init__(self, config: Mapping[str, Any], bus: EventBus, context: RunContext) -> None:
        self.interval = config["exp_opts"]["checkpoint_interval"]
        self.rounds = config["exp_opts"]["comm_rounds"]
        self.bus, self.context = bus, context
        self._pending: int | None = None

    def subscribe(self, bus: EventBus) -> list[Subscription]:
        self.context.settle.append(self.flush)
        # Lowest priority, as the real checkpointer: after the round's record and logs.
        return [bus.subscribe(RoundFinished, self.checkpoint, work=True, priority=-1_000)]

    async def checkpoint(self, ev: RoundFinished) -> None:
        await self.flush()
        if due(ev.round, self.interval, self.rounds):
            self._pending = ev.round

    async def flush(self) -> None:
        """Announce the checkpoint a real run would have finished writing by now, if any."""
        rnd, self._pending = self._pending, None
        if rnd is not None:
            await self.bus.emit(self.context.make(CheckpointSaved, round=rnd, path="(dry run: not written)",
                                                  nbytes=0, seconds=0.0))
