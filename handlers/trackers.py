"""Experiment trackers: TensorBoard and MLflow sinks fed with per-round scalars of a run.

Both collect the same scalars over a round and write them at its end, with the round as the step:
``train/<metric>/<client>`` (each client's training metrics) and ``train/<metric>/mean``,
``val/<metric>/<client>`` (a client's validation, averaged over its tasks) and ``val/<metric>/mean``,
``comm/upload_bytes`` and ``time/round_s``. Per-client scalars are written for at most ``per_client``
clients (the first that report), so a run of many clients keeps the means alone beyond that.

The config reaches a tracker through ``attach_files(config, record_path, trace_path)``, which the CLI calls on every
handler that has it; TensorBoard shows it as text and hyperparameters, MLflow as params. MLflow also gets
the record and the trace as artifacts and the run's status at the end. A resumed run continues the same
tracker run: TensorBoard writes into the same run folder and drops the earlier steps from the resumed round
on (``purge_step``); MLflow finds the run by its ``fedevents.run_id`` tag.

The libraries are optional extras: ``pip install 'fedevents[tensorboard]'`` or ``'fedevents[mlflow]'``.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedevents.engine.bus import EventBus, Subscription
from fedevents.engine.events import (
    ClientUploaded,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentInterrupted,
    ExperimentStarted,
    GlobalValDone,
    RoundFinished,
    TrainDone,
    ValDone,
    ValReused,
)

from .logsink import SINK_PRIORITY

__all__ = ["MlflowTracker", "RoundScalars", "TRACKER_PRIORITY", "TensorBoardTracker", "flatten"]

#: After the default sinks (so the record and trace are written when a tracker reads them), before work.
TRACKER_PRIORITY = SINK_PRIORITY - 1
_END = {ExperimentFinished: "finished", ExperimentFailed: "failed", ExperimentInterrupted: "interrupted"}


class RoundScalars:
    """The scalars of one round, collected from its events; ``per_client`` caps the clients named."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._named: set[str] = set()
        self.reset()

    def reset(self) -> None:
        self.train: dict[str, dict[str, float]] = {}
        self.val: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.glob: dict[str, list[float]] = defaultdict(list)  # the global model's scores, over tasks
        self.upload_bytes = 0

    def add_train(self, client: str, metrics: Mapping[str, float]) -> None:
        self.train[client] = _numbers(metrics)

    def add_val(self, client: str, metrics: Mapping[str, float]) -> None:
        for name, value in _numbers(metrics).items():
            self.val[client][name].append(value)

    def add_global(self, metrics: Mapping[str, float]) -> None:
        for name, value in _numbers(metrics).items():
            self.glob[name].append(value)

    def scalars(self, round_seconds: float) -> dict[str, float]:
        """Every scalar of the round by its tag; then the collector is empty for the next round."""
        out: dict[str, float] = {}
        self._add("train", {c: dict(m) for c, m in self.train.items()}, out)
        self._add("val", {c: {m: sum(v) / len(v) for m, v in ms.items()} for c, ms in self.val.items()}, out)
        out.update({f"global/{name}": sum(v) / len(v) for name, v in self.glob.items()})
        out["comm/upload_bytes"] = float(self.upload_bytes)
        out["time/round_s"] = float(round_seconds)
        self.reset()
        return out

    def _add(self, phase: str, per_client: dict[str, dict[str, float]], out: dict[str, float]) -> None:
        sums: dict[str, list[float]] = defaultdict(list)
        for client, metrics in per_client.items():
            named = client in self._named or len(self._named) < self.per_client
            if named:
                self._named.add(client)
            for name, value in metrics.items():
                sums[name].append(value)
                if named:
                    out[f"{phase}/{name}/{client}"] = value
        for name, values in sums.items():
            out[f"{phase}/{name}/mean"] = sum(values) / len(values)


class _Tracker(ABC):
    """The event side shared by both trackers; subclasses write."""

    def __init__(self, per_client: int) -> None:
        self.config: Mapping[str, Any] = {}
        self.record_path: Path | None = None
        self.trace_path: Path | None = None
        self._scalars = RoundScalars(per_client)
        self._subs: list[Subscription] = []
        self._open = False

    def attach_files(self, config: Mapping[str, Any], record_path: Path | None = None,
                     trace_path: Path | None = None) -> None:
        """Give the tracker the run's config and the files to attach at the end."""
        self.config, self.record_path, self.trace_path = config, record_path, trace_path

    def subscribe(self, bus: EventBus, *, priority: int = TRACKER_PRIORITY) -> list[Subscription]:
        handlers = {ExperimentStarted: self._started, TrainDone: self._train_done, ValDone: self._val_done,
                    ValReused: self._val_reused,
                    GlobalValDone: lambda ev: self._scalars.add_global(ev.metrics),
                    ClientUploaded: self._uploaded, RoundFinished: self._round_finished,
                    **{kind: self._ended for kind in _END}}
        self._subs += [bus.subscribe(kind, handler, priority=priority) for kind, handler in handlers.items()]
        return list(self._subs)

    def close(self) -> None:
        for sub in self._subs:
            sub.unsubscribe()
        self._subs.clear()
        if self._open:
            self._open = False
            self.finish(None)

    def _started(self, ev: ExperimentStarted) -> None:
        if not self._open and not ev.dry_run:
            self.start(ev)
            self._open = True

    def _train_done(self, ev: TrainDone) -> None:
        self._scalars.add_train(ev.client, ev.metrics)

    def _val_done(self, ev: ValDone) -> None:
        self._scalars.add_val(ev.client, ev.metrics)

    def _val_reused(self, ev: ValReused) -> None:
        for client, scores in zip(ev.clients, ev.scores):
            for metrics in scores.values():
                self._scalars.add_val(client, metrics)

    def _uploaded(self, ev: ClientUploaded) -> None:
        self._scalars.upload_bytes += ev.nbytes

    def _round_finished(self, ev: RoundFinished) -> None:
        scalars = self._scalars.scalars(ev.seconds)
        if self._open:
            self.write(ev.round, scalars)

    def _ended(self, ev: Any) -> None:
        if self._open:
            self._open = False
            self.finish(_END[type(ev)])

    # --- what a tracker writes ----------------------------------------------------------------------------

    @abstractmethod
    def start(self, ev: ExperimentStarted) -> None:
        """Open the tracker run (``start``) or write one round's scalars (``write``)."""

    @abstractmethod
    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Open the tracker run (``start``) or write one round's scalars (``write``)."""

    @abstractmethod
    def finish(self, status: str | None) -> None:
        """End the tracker run with ``status`` (None: closed before the run ended)."""


class TensorBoardTracker(_Tracker):
    """Writes ``<log_dir>/<run id>/`` event files that TensorBoard opens (``tensorboard --logdir log_dir``)."""

    def __init__(self, log_dir: str | Path, *, per_client: int = 50) -> None:
        super().__init__(per_client)
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package, not tensorflow

        self._writer_type = SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def start(self, ev: ExperimentStarted) -> None:
        # A resumed run drops the steps it will write again, so the curves have no doubled rounds.
        purge = ev.first_round if ev.resumed else None
        self._writer = self._writer_type(log_dir=str(self.log_dir / ev.run_id), purge_step=purge)
        if not ev.resumed and self.config:
            self._write_config()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def finish(self, status: str | None) -> None:
        self._writer.add_text("status", status or "closed before the run ended")
        self._writer.close()

    def _write_config(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._writer.add_text("config", "```\n" + json.dumps(self.config, indent=2, default=str) + "\n```")
        params = {k: v for k, v in flatten(self.config).items() if isinstance(v, (int, float, str, bool))}
        for summary in hparams(params, {"val/mean": 0.0}):
            self._writer.file_writer.add_summary(summary)


class MlflowTracker(_Tracker):
    """Logs the run to the MLflow tracking store at ``tracking_uri`` (a server, ``sqlite:///…`` or a folder).

    The MLflow experiment is ``experiment`` (default: the run's exp_name); the run is named by its run id.
    """

    def __init__(self, tracking_uri: str, *, experiment: str | None = None, per_client: int = 50) -> None:
        super().__init__(per_client)
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri)
        self.run_id: str | None = None

    def start(self, ev: ExperimentStarted) -> None:
        name = self.experiment or ev.exp_name
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(name)
        earlier = self.client.search_runs([experiment_id], filter_string=f"tags.`fedevents.run_id` = '{ev.run_id}'")
        if ev.resumed and earlier:
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(experiment_id, run_name=ev.run_id, tags={"fedevents.run_id": ev.run_id})
        self.run_id = run.info.run_id
        self._log_params()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(tag), value, now, step) for tag, value in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, status: str | None) -> None:
        for path in (self.record_path, self.trace_path):
            if path is not None and path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        mlflow_status = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=mlflow_status)

    def _log_params(self) -> None:
        from mlflow.entities import Param

        params = [Param(_mlflow_key(k), str(v)[:6000]) for k, v in flatten(self.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists stay whole values (as JSON text where not plain)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value
    return out


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _mlflow_key(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", tag)
