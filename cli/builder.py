"""The composition root: builds experiments from configs, with their work handler, executor and sinks."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from fedevents.engine.config import ExperimentConfig, load_experiments, load_mapping
from fedevents.engine.errors import ConfigError, DeviceError
from fedevents.engine.experiment import Experiment, ResumePoint
from fedevents.engine.vocabulary import Vocabulary
from fedevents.federated import Federation, check_device, check_precision
from fedevents.federated.check import check_config
from fedevents.federated.fingerprint import data_fingerprint
from fedevents.federated.methods import method_class
from fedevents.federated.vocabulary import CATALOGUES
from fedevents.handlers import ClientWork, JsonRecorder, LogSink, TraceRecorder
from fedevents.handlers.checkpoint import (
    Checkpoint,
    Checkpointer,
    check_data,
    check_resumable,
    find_run,
    load_checkpoint,
)
from fedevents.handlers.executors import (
    DryRunCheckpoints,
    Executor,
    ProcessExecutor,
    SimulatedExecutor,
    SimulatedFederation,
    ThreadExecutor,
)
from fedevents.handlers.loading import attach_handler, load_handler
from fedevents.handlers.runlock import RunLock
from fedevents.handlers.steering import RunControl

__all__ = ["build_executor", "build_experiment", "build_experiments", "flag_overrides", "load_configs", "VOCABULARY"]

#: The registries of fedevents.federated, as the config loader asks them.
VOCABULARY = Vocabulary(CATALOGUES)


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


def load_configs(
    paths: Sequence[str | os.PathLike[str]],
    *,
    common: str | os.PathLike[str] | None = None,
    overrides: Sequence[str | tuple[str, str]] = (),
    dry_run: bool = False,
) -> list[ExperimentConfig]:
    """Load and validate every experiment, and check its devices unless it is a dry run."""
    configs = load_experiments(paths, common=common, overrides=overrides, vocabulary=VOCABULARY)
    for cfg in configs:
        _check_new(cfg, dry_run)
    return configs


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
    configs = load_configs(paths, common=common, overrides=overrides, dry_run=dry_run)
    return [build_experiment(cfg, dry_run=dry_run, console=console, sinks=sinks, resume=resume, progress=progress,
                             tensorboard=tensorboard, mlflow=mlflow) for cfg in configs]


def check_buildable(config: ExperimentConfig) -> None:
    """What torch would refuse (an option out of range, a model too large for this machine), found before
    anything is built or written; a dry run checks exactly this too."""
    try:
        check_config(config.data)
    except ValueError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None


def check_devices(config: ExperimentConfig) -> None:
    """Every configured device exists here; a dry run skips this, so it can plan for other machines."""
    if config.executor == "ray":  # the devices are the cluster's: the executor finds them on its nodes
        return
    precision = config.data["exp_opts"]["precision"]
    for device in config.devices:
        try:
            check_device(device)
            check_precision(precision, device)
        except ValueError as exc:
            raise DeviceError(f"{config.source}: {exc}") from None


def build_experiment(
    config: ExperimentConfig | Mapping[str, Any] | str | os.PathLike[str],
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

    ``config`` is a validated config, an experiment file, or a mapping holding what a file would (user
    plugins named in a mapping are imported from the current folder).

    With ``resume``, it continues the newest checkpointed run of the same experiment, or starts from the
    beginning (and says so on ``console``) when there is none. Subscribe your own handlers on
    ``experiment.bus`` before calling ``experiment.run()``. ``progress`` draws a live display on ``console``
    (a terminal), with the log's console lines above it. ``tensorboard`` (a folder) and ``mlflow`` (a tracking
    URI) attach those trackers (docs/handlers.md).
    """
    console = _console(console)
    if isinstance(config, Mapping):
        config = load_mapping(config, overrides=overrides, vocabulary=VOCABULARY)
        _check_new(config, dry_run)
    elif not isinstance(config, ExperimentConfig):
        config = load_experiments([config], overrides=overrides, vocabulary=VOCABULARY)[0]
        _check_new(config, dry_run)
    folder = config.config_dir or Path(config.source).parent
    handlers = [load_handler(e, f"{config.source}: handlers[{i}]", config_dir=folder)
                for i, e in enumerate(config.data["handlers"])]
    lock, checkpoint = None, None
    if resume and not dry_run:
        run_id, lock, checkpoint = _run_to_resume(config, console)
    point = None if checkpoint is None else ResumePoint(checkpoint.round, dict(checkpoint.participations))
    finished = point is not None and point.round >= config.rounds
    # A cluster's executor is made first: its nodes' devices are the pool's.
    executor = build_executor(config, None) if config.executor == "ray" and not dry_run and not finished else None
    created = None
    try:
        exp = Experiment(config, dry_run=dry_run, run_id=run_id, resume=point,
                         devices=None if executor is None else executor.devices())
        if exp.finished:
            _say(console, f"fedevents: {config.exp_name}: run {run_id} already finished its {config.rounds} "
                          f"rounds; nothing to resume (raise exp_opts.comm_rounds to extend it)")
            if lock is not None:
                lock.release()
            return exp
        if finished:
            _say(console, f"fedevents: {config.exp_name}: run {run_id} ran its {config.rounds} rounds but its "
                          f"record was not completed; completing it")
        if lock is None and not dry_run:
            folder = config.checkpoints_dir / exp.paths.run_id
            created = _first_missing(folder)
            lock = RunLock.acquire(folder, config.source)
        if lock is not None:
            exp.on_close(lock.release)  # registered first, so released after every file is closed
        recorder = JsonRecorder(exp.paths.record, config.data) if sinks else None
        if recorder is not None and checkpoint is not None:
            if "record" not in checkpoint.components:
                raise ConfigError(f"checkpoint {checkpoint.path}: expected the record of the rounds before it, found "
                                  f"none, so a resumed record would lack them")
            recorder.load_state_dict(checkpoint.components["record"])
        if checkpoint is not None and "scores" in checkpoint.components:  # older checkpoints: score all again
            exp.scores.load_state_dict(checkpoint.components["scores"])
        components = {"scores": exp.scores, **({} if recorder is None else {"record": recorder})}
        _add_work(exp, checkpoint, components, executor)
        if recorder is not None:
            _add_sinks(exp, console, progress, recorder)
        handlers += _trackers(tensorboard, mlflow)
        trace = exp.paths.trace if "trace" in config.data["outputs"] else None
        for i, handler in enumerate(handlers):
            if callable(getattr(handler, "attach_files", None)):  # a tracker: the config and the files it attaches
                handler.attach_files(config.data, exp.paths.record, trace)
            named = f"handlers[{i}]" if i < len(config.data["handlers"]) else type(handler).__name__  # a tracker
            attach_handler(handler, exp.bus, f"{config.source}: {named}")
            exp.components.append(handler)
            if callable(getattr(handler, "close", None)):
                exp.on_close(handler.close)
    except BaseException:
        if executor is not None:
            executor.close()
        if lock is not None:  # refused while building: nothing ran, the run is free again
            lock.release()
        if created is not None:  # and bad input leaves no folder behind
            shutil.rmtree(created, ignore_errors=True)
        raise
    work = exp.component(ClientWork)
    exp.provide_control(RunControl(exp, None if exp.dry_run else work.federation))
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


def _add_sinks(exp: Experiment, console: TextIO | None, progress: bool, recorder: JsonRecorder) -> None:
    """The default sinks: ``recorder`` writing the record, and the files named in ``outputs:`` (plain or
    ``.gz``)."""
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
    exp.add(recorder)
    exp.add(TraceRecorder(events, paths.trace if "trace" in outputs else None, compress_events=events_gz))


def _check_new(config: ExperimentConfig, dry_run: bool) -> None:
    check_buildable(config)
    if not dry_run:
        check_devices(config)


def _first_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet, or None."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            return missing
        missing = path
    return missing


def _run_to_resume(config: ExperimentConfig,
                   console: TextIO | None) -> tuple[str | None, RunLock | None, Checkpoint | None]:
    """The newest run of ``config``'s experiment, locked, and its newest checkpoint checked against the config.

    A run killed before its first checkpoint is started again from the beginning under its own run id, so
    its record does not stay "running"; with no run at all, a new one starts.
    """
    found = find_run(config.checkpoints_dir, config.exp_name)
    if found is None:
        _say(console, f"fedevents: {config.exp_name}: no checkpoint under {config.checkpoints_dir}; "
                      f"starting from the beginning")
        return None, None, None
    folder, latest = found
    lock = RunLock.acquire(folder, config.source)
    try:
        if latest is None:
            _say(console, f"fedevents: {config.exp_name}: run {folder.name} stopped before its first checkpoint; "
                          f"starting it again from the beginning")
            return folder.name, lock, None
        checkpoint = load_checkpoint(latest)
        check_resumable(checkpoint, config)
    except BaseException:
        lock.release()
        raise
    if checkpoint.round < config.rounds:  # a run past its last round is told about once its record is read
        _say(console, f"fedevents: {config.exp_name}: resuming run {checkpoint.run_id} after round "
                      f"{checkpoint.round} from {latest}")
    return checkpoint.run_id, lock, checkpoint


def _add_work(exp: Experiment, checkpoint: Checkpoint | None, components: dict[str, Any],
              executor: Executor | None = None) -> None:
    """The client-work handler over the configured executor (the simulated clock in a dry run), and the
    checkpointer (its dry-run twin in a dry run), which saves ``components``' state with each checkpoint."""
    config = exp.config
    opts = config.data["exp_opts"]
    # The dry run asks the method too, so that it keeps or re-scores exactly the clients a real run would.
    exp.reuse_scores = method_class(config.method).reusable_scores
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
    data = data_fingerprint(config.data)
    exp.on_close(lambda: shutil.rmtree(spill, ignore_errors=True))
    if checkpoint is not None:
        check_data(checkpoint, config, data)
        federation.load_state_dict(checkpoint.federation)
    participations = None if exp.resume is None else exp.resume.participations
    executor = executor or build_executor(config, federation)
    exp.add(ClientWork(federation, executor, exp.pool, exp.bus, exp.context,
                       timeout_s=opts["client_timeout_s"]))
    exp.add(Checkpointer(config, federation, exp.bus, exp.context, participations=participations,
                         components=components, data=data, resume=checkpoint))


def build_executor(config: ExperimentConfig, federation: Federation | None) -> Executor:
    """The executor ``config.executor`` names, for ``federation``'s jobs (a Ray executor needs only the
    config: its workers build themselves from it)."""
    threads = config.data["exp_opts"]["torch_threads"]
    if config.executor == "ray":
        from fedevents.handlers.executors.ray import RayExecutor

        return RayExecutor(config, config.data, config.seed, torch_threads=threads)
    assert federation is not None
    if config.executor == "process":
        return ProcessExecutor(federation.config, federation.seed, torch_threads=threads)
    return ThreadExecutor(federation.worker, torch_threads=threads)


def _say(console: TextIO | None, line: str) -> None:
    if console is not None:
        print(line, file=console, flush=True)
