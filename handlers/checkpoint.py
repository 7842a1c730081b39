"""Checkpoints at round boundaries: everything a killed run needs to resume with identical results.

A checkpoint holds the global model, every client state that exists (model, optimizer, scheduler), how
often each client has trained (its task-stream position and whether it is new to the server), the round,
the run id and the config. The engine's sampling needs no saved state: it is derived from (seed, round).

Files live in ``<checkpoints_dir>/<run_id>/round-NNNNNN.pt``. Each is written to a temporary file, flushed
to disk and renamed, so a crash while writing leaves the previous checkpoint as it was. Only plain data
and tensors are stored and they are read with ``torch.load(..., weights_only=True)``: loading a
checkpoint can never run code.
"""

from __future__ import annotations

import os
import pickle
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import anyio
import torch
from fedevents.engine.bus import EventBus, Subscription
from fedevents.engine.config import ExperimentConfig
from fedevents.engine.context import RunContext
from fedevents.engine.errors import CheckpointError, RunFailed
from fedevents.engine.events import (
    CheckpointSaved,
    ClientDispatched,
    RoundFinished,
    json_safe,
)
from fedevents.engine.runner import due

from .atomic import write_atomic
from .logsink import SINK_PRIORITY

__all__ = ["Checkpointer", "Checkpoint", "find_latest", "load_checkpoint", "check_resumable", "SAFE_TO_CHANGE"]

FORMAT = "fedevents-checkpoint"
VERSION = 1
_FILE = re.compile(r"^round-(\d{6})\.pt$")

#: Keys a resumed run may change: where things go and how fast they run, and comm_rounds to extend a run.
#: Anything else could change the results, so a resume with it changed is refused.
SAFE_TO_CHANGE = (
    "exp_opts.comm_rounds",
    "exp_opts.clients_in_memory",
    "exp_opts.checkpoint_interval",
    "exp_opts.checkpoint_keep",
    "exp_opts.handler_timeout_s",
    "device",
    "parallel",
    "executor",
    "ray",
    "logs_dir",
    "checkpoints_dir",
    "datasets_dir",
    "handlers",
    "dry_run_opts",
)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    run_id: str
    round: int
    config: dict[str, Any]
    participations: dict[str, int]
    federation: dict[str, Any]


class Checkpointer:
    """Saves a checkpoint after every ``interval`` rounds (round 0 and the last round included)."""

    def __init__(self, config: ExperimentConfig, federation: Any, bus: EventBus, context: RunContext, *,
                 participations: Mapping[str, int] | None = None) -> None:
        self.config = config
        self.federation = federation
        self.bus = bus
        self.context = context
        self.directory = config.checkpoints_dir / context.run_id
        self.interval = config.data["exp_opts"]["checkpoint_interval"]
        self.keep = config.data["exp_opts"]["checkpoint_keep"]
        self.participations: dict[str, int] = dict(participations or {})

    def subscribe(self, bus: EventBus) -> list[Subscription]:
        return [
            bus.subscribe(ClientDispatched, self._count, priority=SINK_PRIORITY + 1),
            # Lowest priority: the record and logs of the round are written before its checkpoint.
            bus.subscribe(RoundFinished, self.save, work=True, priority=-1_000),
        ]

    def _count(self, ev: ClientDispatched) -> None:
        self.participations[ev.client] = self.participations.get(ev.client, 0) + 1

    async def save(self, ev: RoundFinished) -> None:
        if not due(ev.round, self.interval, self.config.rounds):
            return
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "run_id": self.context.run_id,
            "exp_name": self.config.exp_name,
            "round": ev.round,
            "config": json_safe(self.config.data),
            "participations": dict(self.participations),
        }
        began = time.monotonic()
        path = await anyio.to_thread.run_sync(self._write, payload, ev.round)
        await self.bus.emit(self.context.make(CheckpointSaved, round=ev.round, path=str(path),
                                              nbytes=path.stat().st_size, seconds=time.monotonic() - began))

    def _write(self, payload: dict[str, Any], rnd: int) -> Path:
        payload["federation"] = self.federation.state_dict()
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"round-{rnd:06d}.pt"
        try:
            write_atomic(final, lambda f: torch.save(payload, f))
        except OSError as exc:
            raise RunFailed(f"could not write checkpoint {final}: {exc.strerror or exc}; "
                            f"the previous checkpoint is untouched") from exc
        _fsync_dir(self.directory)
        for old in _checkpoint_files(self.directory)[self.keep:]:
            old.unlink(missing_ok=True)
        return final


def find_latest(checkpoints_dir: Path, exp_name: str) -> Path | None:
    """The newest checkpoint of the newest run of ``exp_name`` under ``checkpoints_dir``, if any."""
    if not checkpoints_dir.is_dir():
        return None
    run = re.compile(rf"^{re.escape(exp_name)}-\d{{8}}-\d{{6}}-[0-9a-f]{{6}}$")
    runs = sorted((d for d in checkpoints_dir.iterdir() if d.is_dir() and run.match(d.name)), reverse=True)
    for folder in runs:
        files = _checkpoint_files(folder)
        if files:
            return files[0]
    return None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint safely; anything unexpected is a one-line CheckpointError."""
    _check_archive(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({refused.group(1)})" if refused else ""
        raise CheckpointError(f"checkpoint {path}: refused: it holds a Python object{what} that only unsafe "
                              f"loading could build, and fedevents never loads checkpoints that way") from None
    except Exception as exc:  # torch raises many types for damaged archives
        raise CheckpointError(f"checkpoint {path}: expected a complete fedevents checkpoint, found a truncated "
                              f"or corrupt file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: expected a fedevents checkpoint, found another file")
    if data.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: expected format version {VERSION}, found {data.get('version')!r}")
    missing = [k for k in ("run_id", "round", "config", "participations", "federation") if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path}: expected the keys run_id, round, config, participations and "
                              f"federation, found {', '.join(missing)} missing")
    return Checkpoint(path=path, run_id=data["run_id"], round=int(data["round"]), config=data["config"],
                      participations=dict(data["participations"]), federation=data["federation"])


def _check_archive(path: Path) -> None:
    """A checkpoint is a zip archive whose every member matches its CRC; torch.load checks neither."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        raise CheckpointError(f"checkpoint {path}: expected a fedevents checkpoint (a torch zip archive), "
                              f"found a file that is not one, or is cut short") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: expected a readable file, found {exc.strerror or exc}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path}: expected an intact checkpoint, found {bad} damaged "
                              f"(its checksum does not match)")


def check_resumable(checkpoint: Checkpoint, config: ExperimentConfig) -> None:
    """Refuse a checkpoint of another experiment, or one whose config differs in keys that change results."""
    if checkpoint.config.get("exp_name") != config.exp_name:
        raise CheckpointError(f"checkpoint {checkpoint.path}: expected experiment {config.exp_name!r}, "
                              f"found {checkpoint.config.get('exp_name')!r}")
    saved, now = _flatten(checkpoint.config), _flatten(json_safe(config.data))
    differ = [key for key in sorted(saved.keys() | now.keys())
              if saved.get(key, _MISSING) != now.get(key, _MISSING) and not key.startswith(SAFE_TO_CHANGE)]
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        raise CheckpointError(f"{config.source}: cannot resume run {checkpoint.run_id} with a changed config: "
                              f"{shown} {'differs' if len(differ) == 1 else 'differ'} from the checkpoint (only {', '.join(SAFE_TO_CHANGE)} may change)")
    if checkpoint.round > config.rounds:
        raise CheckpointError(f"{config.source}: exp_opts.comm_rounds = {config.rounds}, but run "
                              f"{checkpoint.run_id} already finished round {checkpoint.round}")


_MISSING = object()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoint files of one run, newest round first; temporary files never count."""
    return sorted((p for p in folder.iterdir() if _FILE.match(p.name)), reverse=True)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
