"""The one place that wires default handlers onto an experiment (the engine's only import of handlers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from .config import ExperimentConfig, load_experiments
from .errors import DeviceError
from .experiment import Experiment

__all__ = ["build_experiment", "build_experiments", "flag_overrides"]


def flag_overrides(*, devices: Sequence[str] | None = None, parallel: int | None = None,
                   logs_dir: str | None = None) -> list[str]:
    """Command-line flags as ``--set`` overrides, so they are validated like every other key."""
    out: list[str] = []
    if devices:
        out.append("device=[" + ", ".join(repr(d) for d in devices) + "]")
    if parallel is not None:
        out.append(f"parallel={parallel}")
    if logs_dir is not None:
        out.append(f"logs_dir={logs_dir!r}")
    return out


def build_experiments(
    paths: Sequence[str | os.PathLike[str]],
    *,
    common: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    console: TextIO | None = sys.stderr,
    sinks: bool = True,
) -> list[Experiment]:
    """Load, validate and wire every experiment before any of them runs."""
    from fedevents.federated import METHODS

    configs = load_experiments(paths, common=common, overrides=overrides, methods=METHODS)
    if not dry_run:
        for cfg in configs:
            check_devices(cfg)
    return [build_experiment(cfg, dry_run=dry_run, console=console, sinks=sinks) for cfg in configs]


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
    console: TextIO | None = sys.stderr,
    sinks: bool = True,
    overrides: Sequence[str] = (),
    run_id: str | None = None,
) -> Experiment:
    """An experiment with its work handlers (real or simulated), default sinks and YAML handlers attached.

    Subscribe your own handlers on ``experiment.bus`` before calling ``experiment.run()``.
    """
    from fedevents.handlers import JsonRecorder, LogSink, SimulatedWork, TraceRecorder, WorkHandlers
    from fedevents.handlers.loading import attach_handler, load_handler

    if not isinstance(config, ExperimentConfig):
        from fedevents.federated import METHODS

        config = load_experiments([config], overrides=overrides, methods=METHODS)[0]
        if not dry_run:
            check_devices(config)
    folder = Path(config.source).parent
    handlers = [load_handler(e, f"{config.source}: handlers[{i}]", config_dir=folder)
                for i, e in enumerate(config.data["handlers"])]
    exp = Experiment(config, dry_run=dry_run, run_id=run_id)
    exp.add(_work(config, exp, dry_run, WorkHandlers, SimulatedWork))
    if sinks:
        exp.add(LogSink(exp.paths.log, console=console, record_path=exp.paths.record))
        exp.add(JsonRecorder(exp.paths.record, config.data))
        exp.add(TraceRecorder(exp.paths.events, exp.paths.trace))
    for handler in handlers:
        attach_handler(handler, exp.bus)
        if callable(getattr(handler, "close", None)):
            exp._closers.append(handler.close)
    return exp


def _work(config: ExperimentConfig, exp: Experiment, dry_run: bool, real: Any, simulated: Any) -> Any:
    if dry_run:
        return simulated(config.data, exp.pool, exp.bus, exp.context)
    from fedevents.federated import Federation
    federation = Federation(config.data, seed=config.seed, max_in_memory=config.data["exp_opts"]["clients_in_memory"])
    return real(federation, exp.pool, exp.bus, exp.context, torch_threads=config.data["exp_opts"]["torch_threads"])
