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

A checkpoint leaves out what nothing will read: the entries of a client's model that the client's next
dispatch overwrites first (its method names them, ``Method.replaced_on_dispatch``), for each client the
next round dispatches to (sampling is a function of the seed and the round). Where no validation scores a
client that sat out a round (``engine.runner.scores_idle_clients``), nothing reads a client's stored model
between its dispatches, so they are left out for every client, whenever its next dispatch comes; a client
that has not trained since keeps what an earlier checkpoint left out, without being exported again. The
manifest lists them under ``dispatched``; loading fills each with the global model's tensor of the same
name, which the dispatch then overwrites, so a resumed run continues with identical results. Under
``failure_policy: tolerate`` a client whose next round fails keeps its stored model and may be validated
with it, so nothing is left out there.

A client's trained weight is stored as its bitwise difference from the global model's weight of the same
name, compressed (``tensorcodec``), wherever that saves bytes; loading gives back the very same bits. A
tensor of the server's state that its method says others of it predict (``Federation.predictions``: FedSTIL's
global ``A`` is ``(1 - a) G``, each client's latest ``theta`` is close to ``G``) is stored as its difference
from that prediction, which loading computes again from the decoded sources.

Writing overlaps the next round: at a round's end the checkpoint's content is taken (references to the
state's tensors, which are never changed in place, and copies of everything else), and a worker thread
writes it while the next round trains. The next round's end (or the run's end) waits for that write and
announces it (CheckpointSaved) before taking another, so two checkpoints never interleave.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping

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
from fedevents.engine.runner import due, online_clients, scores_idle_clients, task_index
from fedevents.federated.fingerprint import describe_change
from fedevents.federated.predictions import predict

from .atomic import write_atomic
from .logsink import SINK_PRIORITY
from .objects import REF, TensorKeys, join, references, split
from .tensorcodec import decode, encode

__all__ = ["Checkpointer", "Checkpoint", "find_latest", "find_run", "load_checkpoint", "check_data", "check_resumable",
           "ADDED_KEYS", "SAFE_TO_CHANGE"]

FORMAT = "fedevents-checkpoint"
VERSION = 5
#: Versions this code reads: 4 is 5 without tensors encoded against a prediction (its FedSTIL states hold the
#: anchors, ``Method.upgrade``), 3 is 4 without entries left out for a dispatch, 2 is 3 without encoded tensors.
READABLE = (2, 3, 4, 5)
PACKS = "packs"
_FILE = re.compile(r"^round-(\d{6})\.pt$")

#: Config keys added after checkpoints were first written, each with the value that does what fedevents did
#: before it: a checkpoint whose config lacks one was written with that behaviour, so the key is unchanged
#: when it holds that value (else a run from before the key could never be resumed).
ADDED_KEYS = {
    "exp_opts.precision": "fp32",
}

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
    #: How each encoded tensor is stored (``tensorcodec``), by key; the others are stored as they are.
    encoded: dict[str, dict[str, Any]] = field(default_factory=dict)


class Checkpointer:
    """Saves a checkpoint after every ``interval`` rounds (round 0 and the last round included).

    ``components`` maps a name to anything with ``state_dict()`` whose state travels with the checkpoint (the
    recorder's, so a resumed record holds every round). ``data`` is the fingerprint of the data trained on.
    ``resume`` is the checkpoint a resumed run continues from: its stored tensors are reused, not rewritten.
    ``overlap`` False writes each checkpoint before the next round starts (for measuring what overlap saves);
    ``leave_out`` False stores every client state whole (for measuring what leaving out replaced entries saves).
    """

    def __init__(self, config: ExperimentConfig, federation: Any, bus: EventBus, context: RunContext, *,
                 participations: Mapping[str, int] | None = None, components: Mapping[str, Any] | None = None,
                 data: Mapping[str, Any] | None = None, resume: Checkpoint | None = None,
                 overlap: bool = True, leave_out: bool = True) -> None:
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
        self.overlap = overlap
        self.leave_out = leave_out
        # Nothing reads a stored model between its client's dispatches: leave out for every client, not only
        # for the next round's.
        self._until_dispatch = (leave_out and config.data["exp_opts"]["failure_policy"] == "fail"
                                and not scores_idle_clients(config))
        self._pending: _Write | None = None  # the checkpoint being written while the next round trains
        self._encoded: dict[str, dict[str, Any]] = {}  # the newest checkpoint's encoded tensors: key -> how
        self._keys = TensorKeys()
        self._objects: dict[str, str] = {}  # the newest checkpoint's tensors: key -> pack
        self._sizes: dict[str, int] = {}  # the newest checkpoint's tensors: key -> bytes
        self._generations: dict[str, int] = {}  # the client generations the newest checkpoint holds
        self._clients: dict[str, Any] = {}  # the newest checkpoint's client states, as a skeleton
        self._left_out: dict[str, frozenset[str]] = {}  # the newest checkpoint's client states held in part
        self._pack_bytes: dict[str, int] = {}  # pack -> bytes of the tensors in it
        self._manifests: dict[str, set[str]] = {}  # manifest name -> the packs it uses
        self._opened: dict[str, dict[str, torch.Tensor]] = {}  # pack -> its tensors, memory-mapped
        if resume is not None:
            for key, tensor in resume.tensors.items():
                self._keys.remember(tensor, key)
                self._sizes[key] = _nbytes(tensor)
            self._objects = dict(resume.objects)
            self._pack_bytes = dict(resume.packs)
            self._encoded = dict(resume.encoded)

    def subscribe(self, bus: EventBus) -> list[Subscription]:
        # The run waits for the write in progress before its last event, however it ends.
        self.context.settle.append(self.flush)
        return [
            bus.subscribe(ClientDispatched, self._count, priority=SINK_PRIORITY + 1),
            # Lowest priority: the record and logs of the round are written before its checkpoint.
            bus.subscribe(RoundFinished, self.save, work=True, priority=-1_000),
            bus.subscribe(ExperimentFinished, self._finished, priority=-1_000),
        ]

    def _count(self, ev: ClientDispatched) -> None:
        self.participations[ev.client] = self.participations.get(ev.client, 0) + 1

    async def save(self, ev: RoundFinished) -> None:
        """Announce the checkpoint written during this round, then take this round's if due and write it in
        the background (or at once, without ``overlap``)."""
        await self.flush()
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
        nxt = self._next_dispatches(ev.round)
        # Taken in a thread (a spilled client is read back from disk), while the run waits.
        content = await anyio.to_thread.run_sync(self._take, payload, nxt)
        self._pending = _Write(lambda: self._write(content, ev.round), ev.round, began)
        if not self.overlap:
            await self.flush()

    async def flush(self) -> None:
        """Wait for the checkpoint being written, if any, and announce it (CheckpointSaved); a write that
        failed raises its RunFailed here."""
        pending = self._pending
        if pending is None:
            return
        try:
            path, nbytes = await pending.wait()
        except anyio.get_cancelled_exc_class():
            raise  # the write goes on; the next flush (the run's end waits, shielded) announces it
        except BaseException:
            self._pending = None
            raise
        self._pending = None
        await self.bus.emit(self.context.make(CheckpointSaved, round=pending.round, path=str(path),
                                              nbytes=nbytes, seconds=pending.seconds))

    def settle_now(self, timeout: float) -> int | None:
        """From another thread, when the event loop is held and cannot flush: wait up to ``timeout`` for the
        checkpoint being written and give its round if it was written whole (None if none or it failed)."""
        pending = self._pending
        return None if pending is None else pending.join(timeout)

    async def _finished(self, ev: ExperimentFinished) -> None:
        await self.flush()  # the run waited for it already, unless something else drove the bus
        # A finished run is only ever resumed to extend it, which needs its last checkpoint alone.
        try:
            self._prune(keep=1)
        except OSError:
            pass  # a checkpoint too many is no failure of a finished run

    def _next_dispatches(self, rnd: int) -> dict[str, str]:
        """The clients round ``rnd + 1`` dispatches to that have a stored state, with the task each will
        train; none under ``failure_policy: tolerate`` (a failed dispatch leaves the stored model in use)."""
        if not self.leave_out or self.config.data["exp_opts"]["failure_policy"] != "fail":
            return {}
        return self._next_tasks(online_clients(self.config, rnd + 1))

    def _take(self, payload: dict[str, Any], dispatches: Mapping[str, str]) -> _Content:
        """This checkpoint's content: the payload with the federation's skeleton, less the entries the next
        dispatches overwrite, the tensors it references (with their versions, to catch a change in place
        while they are written) and the client generations."""
        tensors: dict[str, torch.Tensor] = {}
        if self._until_dispatch:
            federation, generations, exported = self._state(tensors)
            # A state not exported has not changed, and its client has not been dispatched since (a dispatch
            # under failure_policy 'fail' stores a new state or fails the run): what was left out still is.
            left_out = {key: names for key, names in self._left_out.items() if key not in exported}
            left_out.update(self._replaced(self._next_tasks(exported), exported))
        else:
            left_out = self._replaced(dispatches)
            federation, generations, _ = self._state(tensors, also=self._left_out.keys() | left_out.keys())
        left_out = {key: names for key, names in left_out.items() if names}
        payload["federation"] = {**federation, "clients": _without(federation["clients"], left_out)}
        payload["dispatched"] = {key: sorted(names) for key, names in sorted(left_out.items())}
        versions = {key: tensor._version for key, tensor in tensors.items()}
        bases, derived = self._predicted(payload["federation"])
        return _Content(payload, tensors, versions, generations, bases, derived,
                        federation["clients"], left_out)

    def _predicted(self, skeleton: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """Each client tensor's base (``_bases``), overridden where the federation predicts a tensor from others
        of its state: "same" as one source makes that source its base, any other rule a derived base, by key.
        A prediction whose tensors this checkpoint does not hold, or that would make a tensor its own base
        (through others too), is dropped: the tensor is then stored as ``_bases`` says."""
        bases, derived = _bases(skeleton), {}
        ask = getattr(self.federation, "predictions", None)
        for path, prediction in (ask() if callable(ask) else {}).items():
            key, sources = _key_at(skeleton, path), [_key_at(skeleton, source) for source in prediction.sources]
            if key is None or None in sources:
                continue
            if prediction.rule == "same":
                bases[key] = sources[0]
            else:
                bases.pop(key, None)
                derived[key] = {"rule": prediction.rule, "from": sources}
        for key in sorted(bases.keys() | derived.keys()):
            if _reaches(key, key, bases, derived, set()):
                bases.pop(key, None)
                derived.pop(key, None)
        return bases, derived

    def _next_tasks(self, keys: Iterable[str]) -> dict[str, str]:
        """The task each client among ``keys`` that has trained trains at its next dispatch, whenever that
        comes: its number of dispatches so far decides it (other keys are skipped)."""
        out = {}
        for client in keys:
            done = self.participations.get(client, 0)
            if done:
                tasks = self.config.clients.tasks(client)
                out[client] = tasks[task_index(done, self.config.sustain_rounds, len(tasks))]
        return out

    def _replaced(self, dispatches: Mapping[str, str],
                  states: Mapping[str, Any] | None = None) -> dict[str, frozenset[str]]:
        """The stored model entries the next dispatches of ``dispatches``' clients overwrite before anything
        reads them (``states``: those states as exported already)."""
        ask = getattr(self.federation, "replaced_on_dispatch", None)
        if not callable(ask) or not dispatches:
            return {}
        return ask(dispatches) if states is None else ask(dispatches, states=states)

    def _write(self, content: _Content, rnd: int) -> tuple[Path, int]:
        """Write the tensors no kept checkpoint holds into this round's pack, then the manifest; give the
        manifest's path and the bytes written."""
        payload, tensors, generations = content.payload, content.tensors, content.generations
        used = self._with_bases(references(payload["federation"]))
        final = self.directory / f"round-{rnd:06d}.pt"
        pack = f"{rnd:06d}.pt"
        sizes = {key: _nbytes(tensors[key]) if key in tensors and key not in self._objects else self._sizes[key]
                 for key in used}
        fresh = self._to_write(sizes, last=rnd >= self.config.rounds)
        stored, encoded = self._stored(fresh, content, final)
        sizes.update({key: _nbytes(tensor) for key, tensor in stored.items()})
        encoded.update({key: self._encoded[key] for key in used - fresh if key in self._encoded})
        objects = {key: pack if key in fresh else self._objects[key] for key in used}
        if fresh:
            self._pack_bytes[pack] = sum(sizes[key] for key in fresh)
        payload["objects"] = objects
        payload["encoded"] = encoded
        payload["packs"] = {name: self._pack_bytes.get(name, 0) for name in set(objects.values())}
        written = 0
        try:
            packs = self.directory / PACKS
            packs.mkdir(parents=True, exist_ok=True)
            if fresh:
                write_atomic(packs / pack, lambda f: torch.save(stored, f))
                written = (packs / pack).stat().st_size
                _fsync_dir(packs)
            write_atomic(final, lambda f: torch.save(payload, f))
            written += final.stat().st_size
        except OSError as exc:
            raise RunFailed(f"could not write the checkpoint of round {rnd}, {final}: {exc.strerror or exc}; "
                            f"the previous checkpoint is untouched") from exc
        _fsync_dir(self.directory)
        self._manifests[final.name] = set(objects.values())
        self._objects, self._sizes, self._encoded = objects, sizes, encoded
        # The whole skeletons: a state held in part is exported again by the next checkpoint.
        self._generations, self._clients, self._left_out = generations, content.clients, content.left_out
        self._prune(keep=self.keep)
        return final, written

    def _state(self, tensors: dict[str, torch.Tensor], *, also: Collection[str] = frozenset()
               ) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
        """The federation's state as a skeleton, the client generations it was taken at, and the client
        states exported for it.

        Only the clients whose stored state changed since the last checkpoint, and those of ``also``, are
        exported (a spilled client that did not train is not even read back); the others keep last
        checkpoint's skeleton. ``tensors`` gets the tensors of what was exported.
        """
        store = getattr(self.federation, "store", None)
        if not callable(getattr(store, "generations", None)):
            state = self.federation.state_dict()
            return split(state, self._keys, tensors), {}, state["clients"]
        generations = store.generations()
        changed = [c for c, g in generations.items()
                   if self._generations.get(c) != g or c not in self._clients or c in also]
        state = self.federation.state_dict(clients=changed)
        skeleton = split(state, self._keys, tensors)
        fresh = skeleton["clients"]
        skeleton["clients"] = {c: fresh[c] if c in fresh else self._clients[c] for c in generations}
        return skeleton, generations, state["clients"]

    def _stored(self, fresh: set[str], content: _Content,
                final: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
        """The tensors of ``fresh`` as this checkpoint's pack stores them, and how the encoded ones are.

        A new tensor is encoded (against its base, the global model's tensor of the same name, when that is
        in hand) where that saves bytes; a tensor moved out of an older pack is copied as it was stored.
        """
        stored: dict[str, torch.Tensor] = {}
        encoded: dict[str, dict[str, Any]] = {}
        for key in sorted(fresh):
            if key in self._objects:
                stored[key] = self._moved(key, final)
                if key in self._encoded:
                    encoded[key] = self._encoded[key]
                continue
            tensor = content.tensors[key]
            if tensor._version != content.versions[key]:
                raise RunFailed(f"could not write checkpoint {final}: a tensor of its state was changed in "
                                f"place while it was written; the previous checkpoint is untouched")
            base, derived = content.bases.get(key), content.derived.get(key)
            against = content.tensors.get(base) if base is not None else None
            if derived is not None and all(k in content.tensors for k in derived["from"]):
                against = predict(derived["rule"], [content.tensors[k] for k in derived["from"]])
            if against is not None and (against.dtype != tensor.dtype or against.shape != tensor.shape):
                against = None
            done = encode(tensor, against)
            if done is None:
                stored[key] = tensor.contiguous()
                continue
            stored[key], encoded[key] = done
            if against is not None and derived is not None:
                encoded[key]["derived"] = derived
            elif against is not None:
                encoded[key]["base"] = base
        return stored, encoded

    def _with_bases(self, keys: set[str]) -> set[str]:
        """``keys`` and every key an encoded one among them is decoded against (a base, or the sources of a
        derived one, must stay stored)."""
        out, todo = set(keys), list(keys)
        while todo:
            for base in _decoded_against(self._encoded.get(todo.pop(), {})):
                if base not in out:
                    out.add(base)
                    todo.append(base)
        return out

    def _moved(self, key: str, final: Path) -> torch.Tensor:
        """A tensor moved out of a mostly empty pack, as stored there.

        A pack is read once, memory-mapped, and kept open until it is deleted: only the pages of the tensors
        moved are ever read.
        """
        pack = self._objects[key]
        if pack not in self._opened:
            self._opened[pack] = _load_pack(final, pack, [k for k, p in self._objects.items() if p == pack])
        return self._opened[pack][key]

    def _to_write(self, sizes: Mapping[str, int], *, last: bool = False) -> set[str]:
        """The keys this checkpoint must write: new ones, and the live ones of packs that are mostly garbage.

        When the packs this checkpoint would use hold more than twice the bytes it needs, the live tensors
        of the emptiest packs are written again, so that those packs can go once no kept checkpoint uses
        them: the packs of a long run never grow past about twice what is live, and copying is rare. A pack
        of which less than a quarter is still used is emptied the same way, whatever the others hold: a few
        small tensors (a counter, an empty buffer) must not keep a pack of dead weights on disk, and moving
        them costs at most a quarter of what it frees. The run's ``last`` checkpoint is the one a finished run
        keeps alone, so there a pack of which less than three quarters is used is emptied: what stays on disk
        is then mostly live, for at most three times the bytes freed in copying.
        """
        share = 4 / 3 if last else 4
        fresh = {key for key in sizes if key not in self._objects}
        live: dict[str, int] = {}
        for key in sizes.keys() - fresh:
            pack = self._objects[key]
            live[pack] = live.get(pack, 0) + sizes[key]
        needed = sum(sizes.values())
        held = sum(self._pack_bytes.get(pack, 0) for pack in live) + sum(sizes[key] for key in fresh)
        for pack in sorted(live, key=lambda p: live[p] / max(self._pack_bytes.get(p, 0), 1)):
            if held <= 2 * needed and share * live[pack] >= self._pack_bytes.get(pack, 0):
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


@dataclass(frozen=True)
class _Content:
    """A checkpoint as taken at a round's end, ready to be written by another thread."""

    payload: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    versions: dict[str, int]
    generations: dict[str, int]
    #: A client tensor's key -> the key of the global model's tensor of the same name (or of the tensor its
    #: method predicts it by, ``Checkpointer._predicted``).
    bases: dict[str, str]
    #: A tensor's key -> the rule and the source keys of the prediction it is stored against.
    derived: dict[str, dict[str, Any]]
    #: Every client state's whole skeleton, entries left out included.
    clients: dict[str, Any]
    #: The client states held in part, with the model entries left out of each.
    left_out: dict[str, frozenset[str]]


def _without(clients: Mapping[str, Any], left_out: Mapping[str, frozenset[str]]) -> dict[str, Any]:
    """The client skeletons with the model entries ``left_out`` names removed."""
    out = dict(clients)
    for key, names in left_out.items():
        if key in out:
            model = {name: ref for name, ref in out[key]["model"].items() if name not in names}
            out[key] = {**out[key], "model": model}
    return out


def _filled(path: Path, federation: dict[str, Any], dispatched: Any) -> dict[str, Any]:
    """The federation's state with each model entry left out for a dispatch filled with the global model's
    tensor of the same name (the dispatch overwrites it before anything reads it)."""
    if not isinstance(dispatched, dict):
        raise CheckpointError(f"checkpoint {path}: expected a map of the entries left out, found "
                              f"{type(dispatched).__name__}")
    glob, clients = federation["server"]["model"], federation["clients"]
    for key, names in dispatched.items():
        model = clients.get(key, {}).get("model") if isinstance(clients.get(key), dict) else None
        if not isinstance(model, dict) or not isinstance(names, list) or not set(names) <= glob.keys():
            raise CheckpointError(f"checkpoint {path}: expected client state {key!r} and the global model to "
                                  f"hold the entries left out for its dispatch, found them missing")
        left = set(names)
        wanted = left | model.keys()
        # In the global model's order, which is the client model's: the same network.
        whole = {name: glob[name] if name in left else model[name] for name in glob if name in wanted}
        clients[key] = {**clients[key], "model": {**whole, **model}}
    return federation


class _Write:
    """One checkpoint being written by its own thread; ``wait`` gives its outcome on the event loop."""

    def __init__(self, write: Callable[[], tuple[Path, int]], rnd: int, began: float) -> None:
        self.round, self.seconds = rnd, 0.0
        self._began = began
        self._outcome: tuple[Path, int] | None = None
        self._error: BaseException | None = None
        # Not a daemon: a process that ends normally finishes the write first.
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"checkpoint-{rnd}")
        self._thread.start()

    def _run(self, write: Callable[[], tuple[Path, int]]) -> None:
        try:
            self._outcome = write()
        except BaseException as exc:  # handed to the event loop, which raises it
            self._error = exc
        self.seconds = time.monotonic() - self._began

    def join(self, timeout: float) -> int | None:
        """Wait for the write in this thread, up to ``timeout``; its round if it completed, else None."""
        self._thread.join(timeout)
        return None if self._thread.is_alive() or self._error is not None else self.round

    async def wait(self) -> tuple[Path, int]:
        await anyio.to_thread.run_sync(self._thread.join)
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome


def _bases(skeleton: Mapping[str, Any]) -> dict[str, str]:
    """Each client model tensor's key -> the key of the global model's tensor of the same name (when they
    differ and the global one is not itself a client's: a base is never encoded against another)."""
    server = skeleton.get("server", {}).get("model", {}) if isinstance(skeleton.get("server"), dict) else {}
    glob = {name: ref[REF] for name, ref in server.items() if isinstance(ref, dict) and REF in ref} \
        if isinstance(server, dict) else {}
    shared = set(glob.values())
    out: dict[str, str] = {}
    for state in skeleton.get("clients", {}).values():
        model = state.get("model", {}) if isinstance(state, dict) else {}
        for name, ref in model.items():
            key = ref.get(REF) if isinstance(ref, dict) else None
            if key is not None and name in glob and key != glob[name] and key not in shared:
                out[key] = glob[name]
    return out


def _key_at(skeleton: Mapping[str, Any], path: tuple[str, ...]) -> str | None:
    """The key of the tensor at ``path`` in a skeleton, or None when there is none there (left out)."""
    value: Any = skeleton
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value.get(REF) if isinstance(value, dict) and len(value) == 1 else None


def _reaches(start: str, target: str, bases: Mapping[str, str], derived: Mapping[str, dict[str, Any]],
             seen: set[str]) -> bool:
    """Whether decoding ``start`` needs ``target`` (through bases and derived sources)."""
    needs = [bases[start]] if start in bases else list(derived.get(start, {}).get("from", ()))
    for key in needs:
        if key == target:
            return True
        if key not in seen:
            seen.add(key)
            if _reaches(key, target, bases, derived, seen):
                return True
    return False


def _decoded_against(info: Mapping[str, Any]) -> list[str]:
    """The keys an encoded tensor's decoding reads: its base, or the sources of its derived base."""
    if info.get("base") is not None:
        return [str(info["base"])]
    derived = info.get("derived")
    return [str(k) for k in derived.get("from", ())] if isinstance(derived, dict) else []


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
    encoded = data.get("encoded") or {}
    if not isinstance(encoded, dict):
        raise CheckpointError(f"checkpoint {path}: expected a map of its encoded tensors, found "
                              f"{type(encoded).__name__}")
    tensors = _decoded(path, tensors, encoded)
    try:
        federation = join(data["federation"], tensors)
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {path}: expected every tensor it names in its packs, found "
                              f"{exc.args[0]} in none") from None
    federation = _filled(path, federation, data.get("dispatched") or {})
    return Checkpoint(path=path, run_id=data["run_id"], round=int(data["round"]), config=data["config"],
                      participations=dict(data["participations"]), federation=federation,
                      components=dict(data.get("components") or {}), data=dict(data.get("data") or {}),
                      objects=dict(objects), tensors=tensors, packs=dict(data.get("packs") or {}),
                      encoded=dict(encoded))


def _decoded(path: Path, stored: Mapping[str, torch.Tensor],
             encoded: Mapping[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint as they were saved: each encoded one decoded (its base first)."""
    out = {key: tensor for key, tensor in stored.items() if key not in encoded}

    def get(key: str, depth: int) -> torch.Tensor:
        if key in out:
            return out[key]
        info = encoded.get(key)
        if key not in stored or not isinstance(info, dict) or depth > len(encoded):
            raise CheckpointError(f"checkpoint {path}: expected tensor {key} stored, found it missing or "
                                  f"described in a loop")
        base, derived = info.get("base"), info.get("derived")
        try:
            if derived is not None:
                sources = derived.get("from") if isinstance(derived, dict) else None
                if not isinstance(sources, list):
                    raise ValueError(f"expected a derived base with its sources, found {derived!r}")
                against = predict(str(derived.get("rule")), [get(str(k), depth + 1) for k in sources])
            else:
                against = None if base is None else get(str(base), depth + 1)
            out[key] = decode(stored[key], info, against)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path}: expected tensor {key} to decode, found: {exc}") from None
        return out[key]

    for key in stored:
        get(key, 0)
    return out


def _load_manifest(path: Path) -> dict[str, Any]:
    data = _torch_load(path, path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: expected a fedevents checkpoint, found another file")
    if data.get("version") not in READABLE:
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
              if saved.get(key, ADDED_KEYS.get(key, _MISSING)) != now.get(key, _MISSING)
              and not key.startswith(SAFE_TO_CHANGE)]
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
