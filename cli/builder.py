"""The composition root: builds experiments from configs, with their work handler, executor and sinks."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from fedevents.engine.config import ExperimentConfig, load_experiments
from fedevents.engine.errors import ConfigError, DeviceError
from fedevents.engine.experiment import Experiment, ResumePoint
from fedevents.federated import METHODS, Federation, check_device
from fedevents.handlers import ClientWork, JsonRecorder, LogSink, TraceRecorder
from fedevents.handlers.checkpoint import Checkpoint, Checkpointer, check_resumable, find_latest, load_checkpoint
from fedevents.handlers.executors import (
    DryRunCheckpoints,
    Executor,
    ProcessExecutor,
    SimulatedExecutor,
    SimulatedFederation,
    ThreadExecutor,
)
from fedevents.handlers.loading import attach_handler, load_handler

__all__ = ["build_experiment", "build_experiments", "flag_overrides"]


class _Default:
    """Marker: write to whatever ``sys.stderr`` is when the experiment is built."""


_DEFAULT = _Default()


def _console(console: TextIO | None | _Default) -> TextIO | None:
    return sys.stderr if isinstance(console, _Default) else console


def flag_overrides(*, devices: Sequence[str] | None = None, parallel: int | None = None,
                   logs_dir: str | None = None, executor: str | None = None) -> list[tuple[str, str]]:
    """Command-line flags as labelled overrides: validated like every key, and named as flags in messages."""
    out: list[tuple[str, str]] = []
    if devices:
        out.append(("--device", "device=[" + ", ".join(repr(d) for d in devices) + "]"))
    if parallel is not None:
        out.append(("--parallel", f"parallel={parallel}"))
    if logs_dir is not None:
        out.append(("--logs-dir", f"logs_dir={logs_dir!r}"))
    if executor is not None:
        out.append(("--executor", f"executor={executor!r}"))
    return out


def build_experiments(
    paths: Sequence[str | os.PathLike[str]],
    *,
    common: str | os.PathLike[str] | None = None,
    overrides: Sequence[str | tuple[str, str]] = (),
    dry_run: bool = False,
    console: TextIO | None | _Default = _DEFAULT,
    sinks: bool = True,
    resume: bool = False,
    progress: bool = False,
    tensorboard: str | None = None,
    mlflow: str | None = None,
) -> list[Experiment]:
    """Load, validate and wire every experiment before any of them runs."""
    console = _console(console)
    configs = load_experiments(paths, common=common, overrides=overrides, methods=METHODS)
    if not dry_run:
        for cfg in configs:
            check_devices(cfg)
    return [build_experiment(cfg, dry_run=dry_run, console=console, sinks=sinks, resume=resume, progress=progress,
                             tensorboard=tensorboard, mlflow=mlflow) for cfg in configs]


def check_devices(config: ExperimentConfig) -> None:
    """Every configured device exists here; a dry run skips this, so it can plan for other machines."""
    for device in config.devices:
        try:
            check_device(device)
        except ValueError as exc:
            raise DeviceError(f"{config.source}: {exc}") from None


def build_experiment(
    config: ExperimentConfig | str | os.PathLike[str],
    *,
    dry_run: bool = False,
    console: TextIO | None | _Default = _DEFAULT,
    sinks: bool = True,
    overrides: Sequence[str | tuple[str, str]] = (),
    run_id: str | None = None,
    resume: bool = False,
    progress: bool = False,
    tensorboard: str | None = None,
    mlflow: str | None = None,
) -> Experiment:
    """An experiment with its work handlers (real or simulated), default sinks and YAML handlers attached.

    With ``resume``, it continues the newest checkpointed run of the same experiment, or starts from the
    beginning (and says so on ``console``) when there is none. Subscribe your own handlers on
    ``experiment.bus`` before calling ``experiment.run()``. ``progress`` draws a live display on ``console``
    (a terminal), with the log's console lines above it. ``tensorboard`` (a folder) and ``mlflow`` (a tracking
    URI) attach those trackers (docs/handlers.md).
    """
    console = _console(console)
    if not isinstance(config, ExperimentConfig):
        config = load_experiments([config], overrides=overrides, methods=METHODS)[0]
        if not dry_run:
            check_devices(config)
    folder = Path(config.source).parent
    handlers = [load_handler(e, f"{config.source}: handlers[{i}]", config_dir=folder)
                for i, e in enumerate(config.data["handlers"])]
    checkpoint = _checkpoint_to_resume(config, console) if resume and not dry_run else None
    point = None if checkpoint is None else ResumePoint(checkpoint.round, dict(checkpoint.participations))
    if checkpoint is not None:
        run_id = checkpoint.run_id
    exp = Experiment(config, dry_run=dry_run, run_id=run_id, resume=point)
    if exp.finished:
        return exp
    _add_work(exp, checkpoint)
    if sinks:
        _add_sinks(exp, console, progress)
    handlers += _trackers(tensorboard, mlflow)
    for handler in handlers:
        if callable(getattr(handler, "bind", None)):  # a tracker: it gets the config and the files to attach
            handler.bind(config.data, exp.paths.record, exp.paths.trace if "trace" in config.data["outputs"] else None)
        attach_handler(handler, exp.bus)
        if callable(getattr(handler, "close", None)):
            exp.on_close(handler.close)
    return exp


def _trackers(tensorboard: str | None, mlflow: str | None) -> list[Any]:
    """The trackers the --tensorboard and --mlflow flags ask for; a missing extra is a one-line error."""
    out: list[Any] = []
    for flag, value, extra in (("--tensorboard", tensorboard, "tensorboard"), ("--mlflow", mlflow, "mlflow")):
        if value is None:
            continue
        try:
            from fedevents.handlers.trackers import MlflowTracker, TensorBoardTracker

            out.append(TensorBoardTracker(value) if extra == "tensorboard" else MlflowTracker(value))
        except ImportError as exc:
            raise ConfigError(f"{flag}: expected the {extra} extra (pip install 'fedevents[{extra}]'), "
                              f"found no module {exc.name!r}") from None
    return out


def _add_sinks(exp: Experiment, console: TextIO | None, progress: bool) -> None:
    """The default sinks, writing the record and the files named in ``outputs:`` (plain or ``.gz``)."""
    if progress and console is not None:
        from fedevents.handlers.progress import LiveProgress  # rich is needed only for the live display

        live = exp.add(LiveProgress(console))
        console = live.console_stream
        work = exp.component(ClientWork)
        if work is not None:
            work.on_epoch(live.epoch)
    outputs = set(exp.config.data["outputs"])
    paths = exp.paths

    def chosen(name: str, path: Path) -> tuple[Path | None, bool]:
        if f"{name}.gz" in outputs:
            return path.with_name(path.name + ".gz"), True
        return (path if name in outputs else None), False

    log, log_gz = chosen("log", paths.log)
    events, events_gz = chosen("events", paths.events)
    # Without a log file the sink still prints the run's summary lines.
    exp.add(LogSink(log, console=console, record_path=paths.record, compress=log_gz))
    exp.add(JsonRecorder(paths.record, exp.config.data))
    exp.add(TraceRecorder(events, paths.trace if "trace" in outputs else None, compress_events=events_gz))


def _checkpoint_to_resume(config: ExperimentConfig, console: TextIO | None) -> Checkpoint | None:
    """The newest checkpoint of ``config``'s experiment, checked against the config; None if there is none."""
    latest = find_latest(config.checkpoints_dir, config.exp_name)
    if latest is None:
        _say(console, f"fedevents: {config.exp_name}: no checkpoint under {config.checkpoints_dir}; "
                      f"starting from the beginning")
        return None
    checkpoint = load_checkpoint(latest)
    check_resumable(checkpoint, config)
    if checkpoint.round >= config.rounds:
        _say(console, f"fedevents: {config.exp_name}: run {checkpoint.run_id} already finished its {config.rounds} "
                      f"rounds; nothing to resume (raise exp_opts.comm_rounds to extend it)")
    else:
        _say(console, f"fedevents: {config.exp_name}: resuming run {checkpoint.run_id} after round "
                      f"{checkpoint.round} from {latest}")
    return checkpoint


def _add_work(exp: Experiment, checkpoint: Checkpoint | None) -> None:
    """The client-work handler over the configured executor (the simulated clock in a dry run), and the
    checkpointer (its dry-run twin in a dry run)."""
    config = exp.config
    opts = config.data["exp_opts"]
    if exp.dry_run:
        exp.add(ClientWork(SimulatedFederation(config.data), SimulatedExecutor(config.data), exp.pool, exp.bus,
                           exp.context))
        exp.add(DryRunCheckpoints(config.data, exp.bus, exp.context))
        return
    spill = config.checkpoints_dir / exp.paths.run_id / "spill"
    try:
        federation = Federation(config.data, seed=config.seed, max_in_memory=opts["clients_in_memory"],
                                spill_dir=str(spill))
    except ValueError as exc:  # a method option, a model option or the data set's layout
        raise ConfigError(f"{config.source}: {exc}") from None
    exp.on_close(lambda: shutil.rmtree(spill, ignore_errors=True))
    if checkpoint is not None:
        federation.load_state_dict(checkpoint.federation)
    participations = None if exp.resume is None else exp.resume.participations
    exp.add(ClientWork(federation, build_executor(config, federation), exp.pool, exp.bus, exp.context,
                       timeout_s=opts["client_timeout_s"]))
    exp.add(Checkpointer(config, federation, exp.bus, exp.context, participations=participations))


def build_executor(config: ExperimentConfig, federation: Federation) -> Executor:
    """The executor ``config.executor`` names, for ``federation``'s jobs."""
    threads = config.data["exp_opts"]["torch_threads"]
    if config.executor == "process":
        return ProcessExecutor(federation.config, federation.seed, torch_threads=threads)
    if config.executor == "ray":
        from fedevents.handlers.executors.ray import RayExecutor

        return RayExecutor(config, federation.config, federation.seed, torch_threads=threads)
    return ThreadExecutor(federation.worker, torch_threads=threads)


def _say(console: TextIO | None, line: str) -> None:
    if console is not None:
        print(line, file=console, flush=True)
