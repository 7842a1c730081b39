"""Typed, immutable events: one class per fact that happens during an experiment.

Every event carries where it comes from (run id, experiment name), when it happened (a per-run sequence
number, wall-clock and monotonic time) and the ids it is about. Metrics are plain numbers; tensors never
ride on events. An event is frozen all the way down: mappings become read-only copies and sequences
tuples, so what one handler receives no handler can change for the others. ``to_dict`` turns any event
into a JSON-safe dict (strict JSON: a non-finite number becomes the string ``"NaN"``, ``"Infinity"`` or
``"-Infinity"``); the layout is versioned by ``SCHEMA_VERSION`` and documented in docs/events.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import abc
from dataclasses import dataclass, field
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from types import MappingProxyType
from typing import Any, Callable, Mapping

__all__ = [
    "SCHEMA_VERSION",
    "Event",
    "ExperimentStarted",
    "RoundStarted",
    "ClientsSampled",
    "ClientDispatched",
    "TrainStarted",
    "TrainDone",
    "ClientUploaded",
    "ValScheduled",
    "ValStarted",
    "ValDone",
    "ValReused",
    "GlobalValScheduled",
    "GlobalValDone",
    "UploadsClosed",
    "Aggregated",
    "RoundFinished",
    "ClientFailed",
    "CheckpointSaved",
    "ExperimentInterrupted",
    "ExperimentFinished",
    "ExperimentFailed",
    "EVENT_TYPES",
    "to_dict",
    "json_safe",
    "strict_json",
    "strict_encoder",
    "freeze",
]

#: Bumped whenever a field is renamed or removed; adding a field keeps the version.
SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event: who emitted it and when."""

    run_id: str
    exp_name: str
    seq: int
    wall_time: float
    mono_time: float

    def __post_init__(self) -> None:
        # A handler must not change what the handlers after it receive: copy mappings read-only, and
        # lists to tuples. Only the fields that can hold containers are looked at (events are many).
        for name in _container_fields(type(self)):
            value = getattr(self, name)
            if not isinstance(value, (tuple, MappingProxyType)):
                object.__setattr__(self, name, freeze(value))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExperimentStarted(Event):
    """The experiment is configured and about to run its first round."""

    method: str
    rounds: int
    clients: int
    online_clients: int
    devices: tuple[str, ...]
    parallel: int
    seed: int
    dry_run: bool
    first_round: int = 0
    resumed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundStarted(Event):
    """A communication round began (round 0 is the initial validation)."""

    round: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientsSampled(Event):
    """The engine chose this round's online clients with its seeded generator."""

    round: int
    clients: tuple[str, ...]
    sample_seed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientDispatched(Event):
    """The server sent a client its state; the train work handler answers this event.

    ``state`` is ``"integrated"`` for a client that has never trained (it gets the full server state) and
    ``"incremental"`` for a client the server has seen before.
    """

    round: int
    client: str
    task: str
    state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainStarted(Event):
    """A client got a device slot and began local training; ``waited_s`` is its wait for the slot."""

    round: int
    client: str
    task: str
    device: str
    slot: int
    waited_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainDone(Event):
    """A client finished local training; ``ran_s`` is the time it held its slot."""

    round: int
    client: str
    task: str
    device: str
    slot: int
    waited_s: float
    ran_s: float
    samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientUploaded(Event):
    """A client's update reached the server's inbox for this round."""

    round: int
    client: str
    task: str
    samples: int
    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ValScheduled(Event):
    """The engine asked for a client to be validated on ``tasks``; the validate work handler answers."""

    round: int
    client: str
    tasks: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ValStarted(Event):
    """A client got a device slot and began validation."""

    round: int
    client: str
    device: str
    slot: int
    waited_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ValDone(Event):
    """A client was scored on one task."""

    round: int
    client: str
    task: str
    device: str
    slot: int
    ran_s: float
    samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ValReused(Event):
    """Clients whose stored state has not changed since they were last scored keep those scores this round.

    No validation job runs for them. ``clients`` are in client order; for the client at position ``i``,
    ``scored_in[i]`` is the round whose scores it keeps and ``scores[i]`` those scores, by task (the metrics
    of its ValDone events of that round). One event per validation round stands for what would otherwise
    be a ValScheduled, a ValStarted and a ValDone per task of each of these clients.
    """

    round: int
    clients: tuple[str, ...]
    scored_in: tuple[int, ...]
    scores: tuple[Mapping[str, Mapping[str, float]], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class GlobalValScheduled(Event):
    """The engine asked for the global (aggregated) model to be scored on ``tasks``' server-side test sets."""

    round: int
    tasks: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class GlobalValDone(Event):
    """The global model was scored on one task's server-side test set."""

    round: int
    task: str
    device: str
    slot: int
    ran_s: float
    samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadsClosed(Event):
    """The server stopped taking uploads for the round; the aggregate work handler answers."""

    round: int
    clients: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Aggregated(Event):
    """The server combined this round's uploads into its new state."""

    round: int
    clients: tuple[str, ...]
    samples: int
    ran_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundFinished(Event):
    """A round ended; ``trained`` and ``failed`` count this round's clients, ``validated`` those with scores
    for the round, of which ``reused`` kept earlier ones (ValReused)."""

    round: int
    trained: int
    failed: int
    validated: int
    seconds: float
    reused: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientFailed(Event):
    """A client's work raised; ``phase`` is ``"train"``, ``"validate"`` or ``"aggregate"``."""

    round: int
    client: str
    task: str
    phase: str
    error_type: str
    error: str
    traceback: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSaved(Event):
    """Everything needed to resume after ``round`` was written, atomically, to ``path``."""

    round: int
    path: str
    nbytes: int
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ExperimentInterrupted(Event):
    """A signal (SIGINT or SIGTERM) stopped the run; it can resume from its last checkpoint."""

    round: int
    signal: str
    last_checkpoint: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ExperimentFinished(Event):
    """The run ended well: every round ran, or a handler stopped it after ``rounds`` rounds (``stopped``
    says why; empty when every round ran). ``seconds`` is the wall time of the whole run."""

    rounds: int
    seconds: float
    stopped: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ExperimentFailed(Event):
    """The run stopped early; ``reason`` is the one line a user sees."""

    round: int
    reason: str
    error_type: str
    traceback: str = ""


EVENT_TYPES: tuple[type[Event], ...] = (
    ExperimentStarted,
    RoundStarted,
    ClientsSampled,
    ClientDispatched,
    TrainStarted,
    TrainDone,
    ClientUploaded,
    ValScheduled,
    ValStarted,
    ValDone,
    ValReused,
    GlobalValScheduled,
    GlobalValDone,
    UploadsClosed,
    Aggregated,
    RoundFinished,
    ClientFailed,
    CheckpointSaved,
    ExperimentInterrupted,
    ExperimentFinished,
    ExperimentFailed,
)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_CONTAINER_FIELDS: dict[type, tuple[str, ...]] = {}


def _container_fields(cls: type) -> tuple[str, ...]:
    names = _CONTAINER_FIELDS.get(cls)
    if names is None:
        names = _CONTAINER_FIELDS[cls] = tuple(
            f.name for f in dataclasses.fields(cls) if "Mapping" in str(f.type) or "tuple" in str(f.type)
        )
    return names


def freeze(value: Any) -> Any:
    """A read-only deep copy: mappings as ``MappingProxyType`` over a new dict, lists and tuples as tuples."""
    if isinstance(value, abc.Mapping):  # not typing.Mapping, whose isinstance costs microseconds per event
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def to_dict(event: Event) -> dict[str, Any]:
    """The JSON-safe form of ``event``: its fields, ``"event"`` (the class name) and ``"schema"``."""
    cls = type(event)
    names = _FIELD_NAMES.get(cls)
    if names is None:  # dataclasses.fields() is slow enough to matter once per event
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    out: dict[str, Any] = {"event": cls.__name__, "schema": SCHEMA_VERSION}
    for name in names:
        value = getattr(event, name)
        kind = type(value)
        # Finite floats are written as they are (inf - inf and nan - nan are nan, never 0).
        plain = kind in _PLAIN or (kind is float and value - value == 0.0)
        out[name] = value if plain else json_safe(value)
    return out


_PLAIN = frozenset({str, int, bool, type(None)})
#: How a number JSON cannot hold is written: the names JavaScript gives them.
NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_safe(value: Any) -> Any:
    """A JSON-safe deep copy: mappings (string keys) and lists of plain values; anything else as text.

    Strict JSON has no NaN or infinity: a non-finite float becomes ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"``.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else NONFINITE[repr(value)]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, abc.Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [json_safe(v) for v in value]
    return str(value)


def strict_encoder(separators: tuple[str, str] = (",", ":")) -> Callable[[Any], str]:
    """``json.JSONEncoder(separators=separators, allow_nan=False, default=str).encode``: the same text, with
    its C encoder made once here, where ``encode`` makes a new one on every call (a third of the cost of an
    event's line). Like ``encode`` it raises ValueError on a NaN or an infinity (``strict_json`` then writes
    them as ``json_safe`` does).

    It keeps no record of the containers it is inside (``check_circular``): a container that holds itself
    raises RecursionError, as ``json_safe`` of it does, rather than ValueError.
    """
    item, key = separators
    if c_make_encoder is None:  # an interpreter without json's C module
        return json.JSONEncoder(separators=separators, allow_nan=False, default=str).encode
    chunks = c_make_encoder(None, str, encode_basestring_ascii, None, key, item, False, False, False)
    return lambda value: "".join(chunks(value, 0))


_strict = strict_encoder()


def strict_json(value: Any, **options: Any) -> str:
    """``value`` as strict JSON (``json.dumps`` ``options`` allowed): non-finite numbers as ``json_safe``
    writes them, so ``JSON.parse`` and ``jq`` read every file fedevents writes."""
    try:
        return _strict(value) if not options else json.dumps(value, allow_nan=False, default=str, **options)
    except ValueError:  # a NaN or an infinity somewhere: take the slower, safe copy
        safe = json_safe(value)
        return _strict(safe) if not options else json.dumps(safe, allow_nan=False, default=str, **options)
