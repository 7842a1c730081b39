"""Events are frozen, slotted, JSON-safe, and every field is documented in docs/events.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedevents.engine.events import EVENT_TYPES, SCHEMA_VERSION, TrainDone, strict_encoder, strict_json, to_dict
from fedevents.engine.testing import make_event

DOC = (Path(__file__).resolve().parents[2] / "docs" / "events.md").read_text()


def train_done() -> TrainDone:
    return make_event(TrainDone, round=3, client="c1", task="t", device="cuda:0", slot=1, waited_s=0.25,
                      ran_s=1.5, samples=64, metrics={"tr_acc": 0.75, "tr_loss": 0.5})


def test_events_are_frozen_and_slotted() -> None:
    ev = train_done()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.round = 4  # type: ignore[misc]
    assert not hasattr(ev, "__dict__")


def test_to_dict_is_json_safe_and_versioned() -> None:
    data = json.loads(json.dumps(to_dict(train_done())))
    assert data["event"] == "TrainDone" and data["schema"] == SCHEMA_VERSION
    assert data["metrics"] == {"tr_acc": 0.75, "tr_loss": 0.5}
    assert (data["round"], data["client"], data["device"], data["slot"]) == (3, "c1", "cuda:0", 1)
    assert {"run_id", "exp_name", "seq", "wall_time", "mono_time"} <= data.keys()


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
def test_every_event_and_field_is_documented(event_type: type) -> None:
    section = DOC.split(f"### {event_type.__name__}\n", 1)
    assert len(section) == 2, f"docs/events.md has no section for {event_type.__name__}"
    body = section[1].split("\n### ", 1)[0]
    base = {f.name for f in dataclasses.fields(EVENT_TYPES[0].__mro__[1])}
    for field in dataclasses.fields(event_type):
        place = DOC if field.name in base else body
        assert f"| `{field.name}` |" in place, f"{event_type.__name__}.{field.name} is not documented"


class _Float64(float):
    pass


_AWKWARD = ["ü \"q\" \\ \n\u2028 😀", 2**70, -0.0, 5e-324, 1e22, 1e-05, _Float64(2.5), True, None, (1, [2, "x"]),
            {"a": {"b": [1.5, None]}, 1: "int key", None: "null key", 2.5: "float key"}, {}, [], b"bytes", object]


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_strict_encoder_writes_what_json_writes(separators: tuple[str, str]) -> None:
    """The encoder made once writes what json.JSONEncoder(...).encode writes, byte for byte."""
    encode = strict_encoder(separators)
    reference = json.JSONEncoder(separators=separators, allow_nan=False, default=str).encode
    for value in _AWKWARD + [_AWKWARD]:
        assert encode(value) == reference(value), value
    for value in (float("nan"), [float("inf")], {"m": -float("inf")}):
        with pytest.raises(ValueError):
            encode(value)


def test_strict_json_writes_nan_and_the_infinities_as_strings() -> None:
    assert strict_json({"a": [float("nan"), float("inf")], "b": -float("inf"), "c": 1.5}) == (
        '{"a":["NaN","Infinity"],"b":"-Infinity","c":1.5}')
