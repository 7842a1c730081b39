"""Checkpoints at round boundaries: everything a killed run needs to resume with identical results.

A checkpoint holds the global model, every client state that exists (model, optimizer, scheduler), how
often each client has trained (its task-stream position and whether it is new to the server), the round,
the run id, the config, the record of every round so far and the fingerprint of the data. The engine's
sampling needs no saved state: it is derived from (seed, round).

Files live in ``<checkpoints_dir>/<run_id>/``: ``round-NNNNNN.pt`` is a checkpoint's manifest (its state
with each tensor replaced by a key, see ``objects``), ``packs/NNNNNN.pt`` the tensors that
checkpoint was the first to need. A tensor shared by many states (the frozen backbone every client holds)
or unchanged since the last checkpoint (the state of a client that did not train) is stored once. Each file
is written to a temporary file, flushed to disk and renamed, packs before their manifest, so a crash while
writing leaves the previous checkpoint as it was. Only plain data and tensors are stored and they are read
with ``torch.load(..., weights_only=True)``: loading a checkpoint can never run code.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import time
import zipfile
from dataclasses import dataclass, field
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
    ExperimentFinished,
    RoundFinished,
    json_safe,
)
from fedevents.engine.runner import due
from fedevents.federated.fingerprint import describe_change

from .atomic import write_atomic
from .logsink import SINK_PRIORITY
from .objects import TensorKeys, join, references, split

__all__ = ["Checkpointer", "Checkpoint", "find_latest", "find_run", "load_checkpoint", "check_data", "check_resumable",
           "SAFE_TO_CHANGE"]

FORMAT = "fedevents-checkpoint"
VERSION = 2
PACKS = "packs"
_FILE = re.compile(r"^round-(\d{6})\.pt$")

#: Keys a resumed run may change: where things go and how fast they run, and comm_rounds to extend a run.
#: Anything else could change the results, so a resume with it changed is refused.
SAFE_TO_CHANGE = (
    "exp_opts.comm_rounds",
    "exp_opts.clients_in_memory",
    "exp_opts.checkpoint_interval",
    "exp_opts.checkpoint_keep",
    "exp_opts.handler_timeout_s",
    "exp_opts.val_reuse",  # kept scores equal recomputed ones
    "device",
    "parallel",
    "executor",
    "ray",
    "group",
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
    #: The state of the other components saved with it (the record of the rounds so far), by name.
    components: dict[str, Any] = field(default_factory=dict)
    #: The fingerprint of the data the run trained on (``federated.fingerprint``).
    data: dict[str, Any] = field(default_factory=dict)
    #: Where each tensor of the checkpoint is stored: its key -> pack file name.
    objects: dict[str, str] = field(default_factory=dict)
    #: The loaded tensors by key (so a resumed run knows them without reading them).
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The bytes of the tensors in each pack it uses, by pack file name.
    packs: dict[str, int] = field(default_factory=dict)


class Checkpointer:
    """Saves a checkpoint after every ``interval`` rounds (round 0 and the last round included).

    ``components`` maps a name to anything with ``state_dict()`` whose state travels with the checkpoint (the
    recorder's, so a resumed record holds every round). ``data`` is the fingerprint of the data trained on.
    ``resume`` is the checkpoint a resumed run continues from: its stored tensors are reused, not rewritten.
    """

    def __init__(self, config: ExperimentConfig, federation: Any, bus: EventBus, context: RunContext, *,
                 participations: Mapping[str, int] | None = None, components: Mapping[str, Any] | None = None,
                 data: Mapping[str, Any] | None = None, resume: Checkpoint | None = None) -> None:
        self.config = config
        self.federation = federation
        self.bus = bus
        self.context = context
        self.directory = config.checkpoints_dir / context.run_id
        self.interval = config.data["exp_opts"]["checkpoint_interval"]
        self.keep = config.data["exp_opts"]["checkpoint_keep"]
        self.participations: dict[str, int] = dict(participations or {})
        self.components = dict(components or {})
        self.data = dict(data or {})
        self._keys = TensorKeys()
        self._objects: dict[str, str] = {}  # the newest checkpoint's tensors: key -> pack
        self._sizes: dict[str, int] = {}  # the newest checkpoint's tensors: key -> bytes
        self._generations: dict[str, int] = {}  # the client generations the newest checkpoint holds
        self._clients: dict[str, Any] = {}  # the newest checkpoint's client states, as a skeleton
        self._pack_bytes: dict[str, int] = {}  # pack -> bytes of the tensors in it
        self._manifests: dict[str, set[str]] = {}  # manifest name -> the packs it uses
        self._opened: dict[str, dict[str, torch.Tensor]] = {}  # pack -> its tensors, memory-mapped
        if resume is not None:
            for key, tensor in resume.tensors.items():
                self._keys.remember(tensor, key)
                self._sizes[key] = _nbytes(tensor)
            self._objects = dict(resume.objects)
            self._pack_bytes = dict(resume.packs)

    def subscribe(self, bus: EventBus) -> list[Subscription]:
        return [
            bus.subscribe(ClientDispatched, self._count, priority=SINK_PRIORITY + 1),
            # Lowest priority: the record and logs of the round are written before its checkpoint.
            bus.subscribe(RoundFinished, self.save, work=True, priority=-1_000),
            bus.subscribe(ExperimentFinished, self._finished, priority=-1_000),
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
            "data": self.data,
            # Copied now, on the event loop: the components change as soon as the next round starts.
            "components": {name: copy.deepcopy(c.state_dict()) for name, c in self.components.items()},
        }
        began = time.monotonic()
        path, nbytes = await anyio.to_thread.run_sync(self._write, payload, ev.round)
        await self.bus.emit(self.context.make(CheckpointSaved, round=ev.round, path=str(path),
                                              nbytes=nbytes, seconds=time.monotonic() - began))

    def _finished(self, ev: ExperimentFinished) -> None:
        # A finished run is only ever resumed to extend it, which needs its last checkpoint alone.
        try:
            self._prune(keep=1)
        except OSError:
            pass  # a checkpoint too many is no failure of a finished run

    def _write(self, payload: dict[str, Any], rnd: int) -> tuple[Path, int]:
        """Write the tensors no kept checkpoint holds into this round's pack, then the manifest; give the
        manifest's path and the bytes written."""
        tensors: dict[str, torch.Tensor] = {}
        payload["federation"], generations = self._state(tensors)
        used = references(payload["federation"])
        final = self.directory / f"round-{rnd:06d}.pt"
        pack = f"{rnd:06d}.pt"
        sizes = {key: _nbytes(tensors[key]) if key in tensors else self._sizes[key] for key in used}
        fresh = self._to_write(sizes)
        objects = {key: pack if key in fresh else self._objects[key] for key in used}
        if fresh:
            self._pack_bytes[pack] = sum(sizes[key] for key in fresh)
        payload["objects"] = objects
        payload["packs"] = {name: self._pack_bytes.get(name, 0) for name in set(objects.values())}
        written = 0
        try:
            packs = self.directory / PACKS
            packs.mkdir(parents=True, exist_ok=True)
            if fresh:
                new = {key: self._tensor(key, tensors, final).contiguous() for key in fresh}
                write_atomic(packs / pack, lambda f: torch.save(new, f))
                written = (packs / pack).stat().st_size
                _fsync_dir(packs)
            write_atomic(final, lambda f: torch.save(payload, f))
            written += final.stat().st_size
        except OSError as exc:
            raise RunFailed(f"could not write checkpoint {final}: {exc.strerror or exc}; "
                            f"the previous checkpoint is untouched") from exc
        _fsync_dir(self.directory)
        self._manifests[final.name] = set(objects.values())
        self._objects, self._sizes = objects, sizes
        self._generations, self._clients = generations, payload["federation"]["clients"]
        self._prune(keep=self.keep)
        return final, written

    def _state(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, int]]:
        """The federation's state as a skeleton, and the client generations it was taken at.

        Only the clients whose stored state changed since the last checkpoint are exported (a spilled client
        that did not train is not even read back); the others keep last checkpoint's skeleton. ``tensors``
        gets the tensors of what was exported.
        """
        store = getattr(self.federation, "store", None)
        if not callable(getattr(store, "generations", None)):
            return split(self.federation.state_dict(), self._keys, tensors), {}
        generations = store.generations()
        changed = [c for c, g in generations.items() if self._generations.get(c) != g or c not in self._clients]
        skeleton = split(self.federation.state_dict(clients=changed), self._keys, tensors)
        fresh = skeleton["clients"]
        skeleton["clients"] = {c: fresh[c] if c in fresh else self._clients[c] for c in generations}
        return skeleton, generations

    def _tensor(self, key: str, tensors: Mapping[str, torch.Tensor], final: Path) -> torch.Tensor:
        """A tensor checkpoint ``final`` writes: in hand, or (moved out of a mostly empty pack) read from it.

        A pack is read once, memory-mapped, and kept open until it is deleted: only the pages of the tensors
        moved are ever read.
        """
        if key in tensors:
            return tensors[key]
        pack = self._objects[key]
        if pack not in self._opened:
            self._opened[pack] = _load_pack(final, pack, [k for k, p in self._objects.items() if p == pack])
        return self._opened[pack][key]

    def _to_write(self, sizes: Mapping[str, int]) -> set[str]:
        """The keys this checkpoint must write: new ones, and the live ones of packs that are mostly garbage.

        When the packs this checkpoint would use hold more than twice the bytes it needs, the live tensors
        of the emptiest packs are written again, so that those packs can go once no kept checkpoint uses
        them: the packs of a long run never grow past about twice what is live, and copying is rare.
        """
        fresh = {key for key in sizes if key not in self._objects}
        live: dict[str, int] = {}
        for key in sizes.keys() - fresh:
            pack = self._objects[key]
            live[pack] = live.get(pack, 0) + sizes[key]
        needed = sum(sizes.values())
        held = sum(self._pack_bytes.get(pack, 0) for pack in live) + sum(sizes[key] for key in fresh)
        for pack in sorted(live, key=lambda p: live[p] / max(self._pack_bytes.get(p, 0), 1)):
            if held <= 2 * needed:
                break
            fresh.update(key for key in sizes if self._objects.get(key) == pack)
            held += live[pack] - self._pack_bytes.get(pack, 0)
        return fresh

    def _prune(self, *, keep: int) -> None:
        """Keep the newest ``keep`` checkpoints and the packs they use; delete every other pack."""
        manifests = _checkpoint_files(self.directory)
        for old in manifests[keep:]:
            old.unlink(missing_ok=True)
        used: set[str] = set(self._objects.values())
        for manifest in manifests[1:keep]:
            if manifest.name not in self._manifests:
                self._manifests[manifest.name] = set(_objects_of(manifest).values())
            used |= self._manifests[manifest.name]
        for gone in manifests[keep:]:
            self._manifests.pop(gone.name, None)
        packs = self.directory / PACKS
        if not packs.is_dir():
            return
        for path in packs.iterdir():
            if path.name not in used:
                path.unlink(missing_ok=True)
                self._pack_bytes.pop(path.name, None)
                self._opened.pop(path.name, None)


def find_run(checkpoints_dir: Path, exp_name: str) -> tuple[Path, Path | None] | None:
    """The folder of the newest run of ``exp_name`` under ``checkpoints_dir`` and its newest checkpoint
    (None when it stopped before its first one); None when there is no run."""
    if not checkpoints_dir.is_dir():
        return None
    run = re.compile(rf"^{re.escape(exp_name)}-\d{{8}}-\d{{6}}-[0-9a-f]{{6}}$")
    runs = sorted((d for d in checkpoints_dir.iterdir() if d.is_dir() and run.match(d.name)), reverse=True)
    if not runs:
        return None
    files = _checkpoint_files(runs[0])
    return runs[0], files[0] if files else None


def find_latest(checkpoints_dir: Path, exp_name: str) -> Path | None:
    """The newest checkpoint of the newest run of ``exp_name`` under ``checkpoints_dir``, if any."""
    found = find_run(checkpoints_dir, exp_name)
    return None if found is None else found[1]


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint and the packs it uses safely; anything unexpected is a one-line CheckpointError."""
    data = _load_manifest(path)
    objects = data["objects"]
    if not isinstance(objects, dict):
        raise CheckpointError(f"checkpoint {path}: expected a map of its tensors, found {type(objects).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    for pack in sorted(set(objects.values())):
        tensors.update(_load_pack(path, pack, [d for d, p in objects.items() if p == pack]))
    try:
        federation = join(data["federation"], tensors)
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {path}: expected every tensor it names in its packs, found "
                              f"{exc.args[0]} in none") from None
    return Checkpoint(path=path, run_id=data["run_id"], round=int(data["round"]), config=data["config"],
                      participations=dict(data["participations"]), federation=federation,
                      components=dict(data.get("components") or {}), data=dict(data.get("data") or {}),
                      objects=dict(objects), tensors=tensors, packs=dict(data.get("packs") or {}))


def _load_manifest(path: Path) -> dict[str, Any]:
    data = _torch_load(path, path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: expected a fedevents checkpoint, found another file")
    if data.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: expected format version {VERSION}, found {data.get('version')!r}")
    missing = [k for k in ("run_id", "round", "config", "participations", "federation", "objects") if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path}: expected the keys run_id, round, config, participations, "
                              f"federation and objects, found {', '.join(missing)} missing")
    return data


def _load_pack(manifest: Path, pack: str, digests: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``digests`` of one pack, memory-mapped: only the pages a state touches are read."""
    if not isinstance(pack, str) or not re.fullmatch(r"\d{6}\.pt", pack):
        raise CheckpointError(f"checkpoint {manifest}: expected pack names such as 000003.pt, found {pack!r}")
    path = manifest.parent / PACKS / pack
    if not path.is_file():
        raise CheckpointError(f"checkpoint {manifest}: expected its tensors in {path}, found no such file")
    stored = _torch_load(path, manifest, mmap=True)
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {manifest}: expected {path} to map keys to tensors, found another file")
    absent = [d for d in digests if not isinstance(stored.get(d), torch.Tensor)]
    if absent:
        raise CheckpointError(f"checkpoint {manifest}: expected tensor {absent[0]} in {path}, found it missing")
    return {d: stored[d] for d in digests}


def _torch_load(path: Path, checkpoint: Path, *, mmap: bool = False) -> Any:
    _check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({refused.group(1)})" if refused else ""
        raise CheckpointError(f"checkpoint {checkpoint}: refused: it holds a Python object{what} that only unsafe "
                              f"loading could build, and fedevents never loads checkpoints that way") from None
    except Exception as exc:  # torch raises many types for damaged archives
        raise CheckpointError(f"checkpoint {checkpoint}: expected a complete fedevents checkpoint, found a truncated "
                              f"or corrupt file ({type(exc).__name__})") from None


def _objects_of(manifest: Path) -> dict[str, str]:
    """The tensor map of a checkpoint this process wrote (plain data: no pack is read)."""
    try:
        data = torch.load(manifest, map_location="cpu", weights_only=True)
    except Exception:  # a damaged older checkpoint keeps no pack alive
        return {}
    objects = data.get("objects") if isinstance(data, dict) else None
    return objects if isinstance(objects, dict) else {}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


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


def check_data(checkpoint: Checkpoint, config: ExperimentConfig, data: Mapping[str, Any]) -> None:
    """Refuse to resume on data whose fingerprint differs from the checkpoint's, naming what changed."""
    if checkpoint.data != dict(data):
        raise CheckpointError(f"{config.source}: cannot resume run {checkpoint.run_id} on other data: "
                              f"{describe_change(checkpoint.data, data)}")


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
