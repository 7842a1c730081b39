"""Event text: every line and every piece of one is the same bytes json writes for the same value."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedevents.engine import read_events
from fedevents.engine.eventfile import stream_header
from fedevents.engine.events import EVENT_TYPES, TrainDone, json_safe, strict_json, to_dict
from fedevents.engine.testing import make_event
from fedevents.handlers.eventtext import event_line, event_metrics_text, metrics_text, plain_text
from fedevents.handlers.streams import LineStream


# Values of every kind an event field holds, awkward ones included: escapes, non-ASCII, huge and tiny numbers,
# NaN and infinities (written as strings), ints in float fields, numpy-like float subclasses, empty mappings.
class _Float64(float):
    pass


class _Name(str):
    pass


_SAMPLES = {
    "str": ["client-0", 'ü "quoted" \\ \n\t\u2028 😀', ""],
    "int": [0, -7, 2**70],
    "float": [1.5, 0.1, -0.0, 5e-324, 1e22, float("nan"), float("inf"), float("-inf"), 3, _Float64(2.5)],
    "bool": [True, False],
    "tuple[str, ...]": [("synth",), (), ("a", "ü"), ('q "\\ \n', _Name("n"))],
    "Mapping[str, float]": [{"acc": 0.5, "loss": 1e-7}, {}, {"loss": float("nan")}, {"n": 3}, {"ü": _Float64(1.0)},
                            {"t": {"n": 3}}, {1: 0.5}, {"ok": True}, {"big": 2**70}, {_Name("x"): 1.0}],
    "tuple[int, ...]": [(0, 3), (), (2**70,)],
    "tuple[Mapping[str, Mapping[str, float]], ...]": [({"t0": {"val_acc": 0.5, "val_loss": float("inf")}},), (),
                                                      ({"ü": {}}, {"t": {"n": 3}})],
}
# Scalars beside the field types: what plain_text takes and what it leaves to the encoder.
_SCALARS = [*_SAMPLES["str"], *_SAMPLES["int"], *_SAMPLES["float"], True, False, None, 1e-05, 1e16, -1e-300,
            _Name("x"), 2**63, -(2**64), b"x", (1, 2)]


def _every_event() -> list:
    """Ten events of every type, their fields filled with the awkward values above."""
    events = []
    for cls in EVENT_TYPES:
        fields = dataclasses.fields(cls)
        for variant in range(10):
            values = {f.name: _SAMPLES[str(f.type)][(variant + i) % len(_SAMPLES[str(f.type)])]
                      for i, f in enumerate(fields)}
            events.append(cls(**values))
    return events


def _dumps(value: object) -> str:
    """The reference: json.dumps, compact and strict, with json_safe's strings for NaN and the infinities."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(json_safe(value), separators=(",", ":"), allow_nan=False, default=str)


def test_event_line_writes_every_event_as_json_of_to_dict_without_the_run_fields() -> None:
    """event_line writes the text without building the dict; it must be the same bytes for any value."""
    events = _every_event()
    for event in events:
        expected = {k: v for k, v in to_dict(event).items() if k not in ("schema", "run_id", "exp_name")}
        assert event_line(event) == _dumps(expected), event
    assert len(events) == 10 * len(EVENT_TYPES)
    assert list(json.loads(event_line(events[-1]))) == ["event", "seq", "wall_time", "mono_time", "round", "reason",
                                                       "error_type", "traceback"]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_read_events_gives_back_exactly_the_dicts_of_to_dict_for_every_event(tmp_path: Path, compress: bool) -> None:
    """Header plus event lines, read back: the same dicts, keys in the same order, as to_dict makes."""
    # A run's events share its run id and experiment name; the samples vary them, so make them the run's.
    events = [dataclasses.replace(e, run_id="run-1", exp_name='ü "exp"') for e in _every_event()]
    path = tmp_path / ("run.events.jsonl.gz" if compress else "run.events.jsonl")
    stream = LineStream(path, compress=compress)
    stream.write(strict_json(stream_header("run-1", 'ü "exp"')) + "\n")
    for event in events:
        stream.write(event_line(event) + "\n")
    stream.close()
    read = list(read_events(path))
    expected = [json.loads(strict_json(to_dict(e))) for e in events]  # NaN as "NaN", tuples as lists
    assert [list(d.items()) for d in read] == [list(d.items()) for d in expected]


@pytest.mark.parametrize("value", _SCALARS, ids=repr)
def test_plain_text_is_what_json_writes_or_none(value: object) -> None:
    plain = type(value) in (str, int, bool, type(None)) or (type(value) is float and value - value == 0.0)
    assert plain_text(value) == (json.dumps(value, separators=(",", ":")) if plain else None)


@pytest.mark.parametrize("metrics", _SAMPLES["Mapping[str, float]"], ids=repr)
def test_metrics_text_is_what_json_writes_of_plain_metrics_or_none(metrics: dict) -> None:
    plain = all(type(k) is str and (type(v) is int or type(v) is float and v - v == 0.0) for k, v in metrics.items())
    assert metrics_text(metrics) == (json.dumps(metrics, separators=(",", ":")) if plain else None)


def test_an_events_metrics_text_is_its_own_whether_or_not_its_line_was_just_written() -> None:
    """The text kept from the last line written belongs to that event alone: another event with equal fields
    and other metrics gets its own."""
    first = make_event(TrainDone, round=1, client="c0", task="t", device="cpu", slot=0, waited_s=0.0, ran_s=1.0,
                       samples=4, metrics={"tr_acc": 0.5})
    second = dataclasses.replace(first, metrics={"tr_acc": 0.25, "tr_loss": 2.0})
    nan = dataclasses.replace(first, metrics={"tr_loss": float("nan")})
    assert event_metrics_text(second) == '{"tr_acc":0.25,"tr_loss":2.0}'  # no line written yet
    assert event_line(first).endswith(',"metrics":{"tr_acc":0.5}}')
    assert event_metrics_text(first) == '{"tr_acc":0.5}'
    assert event_metrics_text(second) == '{"tr_acc":0.25,"tr_loss":2.0}'
    assert event_line(nan).endswith(',"metrics":{"tr_loss":"NaN"}}')
    assert event_metrics_text(nan) is None  # not plain: the span is encoded whole
