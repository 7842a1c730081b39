"""An experiment ready to run: its config, bus, device pool, run context and attached components."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import anyio

from .bus import EventBus
from .config import ExperimentConfig
from .context import RunContext, new_run_id
from .devices import DevicePool
from .errors import ConfigError
from .runner import Engine

__all__ = ["Experiment", "RunPaths"]


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
    """Subscribe handlers on ``bus`` (or ``add`` components), then ``run()``."""

    def __init__(self, config: ExperimentConfig, *, dry_run: bool = False, run_id: str | None = None,
                 max_in_flight: int = 64) -> None:
        self.config = config
        self.dry_run = dry_run
        self.bus = EventBus()
        self.pool = DevicePool(config.devices, config.parallel)
        self.paths = RunPaths(config.logs_dir, run_id or _unused_run_id(config))
        self.context = RunContext(self.paths.run_id, config.exp_name)
        self.max_in_flight = max_in_flight
        self.components: list[Any] = []
        self._closers: list[Callable[[], None]] = []

    def add(self, component: Any) -> Any:
        """Attach a component with ``subscribe(bus)`` (and, optionally, ``close()``, called after the run)."""
        component.subscribe(self.bus)
        self.components.append(component)
        close = getattr(component, "close", None)
        if callable(close):
            self._closers.append(close)
        return component

    def run(self, *, backend: str = "asyncio") -> None:
        """Run the experiment to the end in a new event loop (``"asyncio"`` or ``"trio"``)."""
        anyio.run(self.run_async, backend=backend)

    async def run_async(self) -> None:
        """Run inside an existing event loop; components are closed on every exit path."""
        try:
            _check_writable(self.config.logs_dir, self.config.source)
            engine = Engine(self.config, self.bus, self.context, dry_run=self.dry_run,
                            max_in_flight=self.max_in_flight)
            await engine.run()
        finally:
            for close in reversed(self._closers):
                close()
            self._closers.clear()


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
