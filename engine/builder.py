"""The one place that wires default handlers onto an experiment (the engine's only import of handlers)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from .config import ExperimentConfig, load_experiments
from .errors import ConfigError, DeviceError
from .experiment import Experiment

__all__ = ["build_experiment", "build_experiments", "flag_overrides"]


class _Default:
    """Marker: write to whatever ``sys.stderr`` is when the experiment is built."""


_DEFAULT = _Default()


def _console(console: TextIO | None | _Default) -> TextIO | None:
    return sys.stderr if isinstance(console, _Default) else console


def flag_overrides(*, devices: Sequence[str] | None = None, parallel: int | None = None,
                   logs_dir: str | None = None) -> list[tuple[str, str]]:
    """Command-line flags as labelled overrides: validated like every key, and named as flags in messages."""
    out: list[tuple[str, str]] = []
    if devices:
        out.append(("--device", "device=[" + ", ".join(repr(d) for d in devices) + "]"))
    if parallel is not None:
        out.append(("--parallel", f"parallel={parallel}"))
    if logs_dir is not None:
        out.append(("--logs-dir", f"logs_dir={logs_dir!r}"))
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
) -> list[Experiment]:
    """Load, validate and wire every experiment before any of them runs."""
    console = _console(console)
    from fedevents.federated import METHODS

    configs = load_experiments(paths, common=common, overrides=overrides, methods=METHODS)
    if not dry_run:
        for cfg in configs:
            check_devices(cfg)
    return [build_experiment(cfg, dry_run=dry_run, console=console, sinks=sinks, resume=resume) for cfg in configs]


def check_devices(config: ExperimentConfig) -> None:
    """Every configured device exists here; a dry run skips this, so it can plan for other machines."""
    from fedevents.federated import check_device

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
) -> Experiment:
    """An experiment with its work handlers (real or simulated), default sinks and YAML handlers attached.

    With ``resume``, it continues the newest checkpointed run of the same experiment, or starts from the
    beginning (and says so on ``console``) when there is none. Subscribe your own handlers on
    ``experiment.bus`` before calling ``experiment.run()``.
    """
    from fedevents.handlers import JsonRecorder, LogSink, TraceRecorder
    from fedevents.handlers.checkpoint import check_resumable, find_latest, load_checkpoint

    console = _console(console)
    from fedevents.handlers.loading import attach_handler, load_handler

    if not isinstance(config, ExperimentConfig):
        from fedevents.federated import METHODS

        config = load_experiments([config], overrides=overrides, methods=METHODS)[0]
        if not dry_run:
            check_devices(config)
    folder = Path(config.source).parent
    handlers = [load_handler(e, f"{config.source}: handlers[{i}]", config_dir=folder)
                for i, e in enumerate(config.data["handlers"])]
    checkpoint = None
    if resume and not dry_run:
        latest = find_latest(config.checkpoints_dir, config.exp_name)
        if latest is None:
            _say(console, f"fedevents: {config.exp_name}: no checkpoint under {config.checkpoints_dir}; "
                          f"starting from the beginning")
        else:
            checkpoint = load_checkpoint(latest)
            check_resumable(checkpoint, config)
            run_id = checkpoint.run_id
            if checkpoint.round >= config.rounds:
                _say(console, f"fedevents: {config.exp_name}: run {run_id} already finished its {config.rounds} "
                              f"rounds; nothing to resume (raise exp_opts.comm_rounds to extend it)")
            else:
                _say(console, f"fedevents: {config.exp_name}: resuming run {run_id} after round "
                              f"{checkpoint.round} from {latest}")
    exp = Experiment(config, dry_run=dry_run, run_id=run_id)
    if checkpoint is not None and checkpoint.round >= config.rounds:
        exp.finished = True
        return exp
    _add_work(exp, checkpoint)
    if sinks:
        exp.add(LogSink(exp.paths.log, console=console, record_path=exp.paths.record))
        exp.add(JsonRecorder(exp.paths.record, config.data))
        exp.add(TraceRecorder(exp.paths.events, exp.paths.trace))
    for handler in handlers:
        attach_handler(handler, exp.bus)
        if callable(getattr(handler, "close", None)):
            exp._closers.append(handler.close)
    return exp


def _add_work(exp: Experiment, checkpoint: Any) -> None:
    """The work handlers: simulated in a dry run, else torch ones with a checkpointer."""
    from fedevents.handlers import SimulatedWork, WorkHandlers

    config = exp.config
    if exp.dry_run:
        exp.add(SimulatedWork(config.data, exp.pool, exp.bus, exp.context))
        return
    from fedevents.federated import Federation
    from fedevents.handlers.checkpoint import Checkpointer

    opts = config.data["exp_opts"]
    spill = config.checkpoints_dir / exp.paths.run_id / "spill"
    try:
        federation = Federation(config.data, seed=config.seed, max_in_memory=opts["clients_in_memory"],
                                spill_dir=str(spill))
    except ValueError as exc:  # a method option, a model option or the data set's layout
        raise ConfigError(f"{config.source}: {exc}") from None
    exp._closers.append(lambda: shutil.rmtree(spill, ignore_errors=True))
    if checkpoint is not None:
        federation.load_state_dict(checkpoint.federation)
        exp.resume_round = checkpoint.round
        exp.participations = dict(checkpoint.participations)
    exp.add(WorkHandlers(federation, exp.pool, exp.bus, exp.context, torch_threads=opts["torch_threads"],
                         timeout_s=opts["client_timeout_s"]))
    exp.add(Checkpointer(config, federation, exp.bus, exp.context, participations=exp.participations))


def _say(console: TextIO | None, line: str) -> None:
    if console is not None:
        print(line, file=console, flush=True)
