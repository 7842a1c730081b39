"""The JSON text of an event, written from its fields: the events stream's line and the pieces a trace span
shares with it.

Every text here is byte for byte what ``strict_json`` writes for the same value, built without the dict and
without the encoder for the values that make up nearly every event (str, int, finite float, bool, None, and
metrics: names to such numbers). Anything else (a NaN, a subclass, a nested mapping) goes the long way,
through ``json_safe`` and the encoder, or makes the caller take it.
"""

from __future__ import annotations

import dataclasses
from json.encoder import encode_basestring_ascii as _json_str  # type: ignore[attr-defined]
from types import MappingProxyType
from typing import Any, Mapping

from fedevents.engine.eventfile import RUN_FIELDS
from fedevents.engine.events import Event, json_safe, strict_json, to_dict

__all__ = ["event_line", "event_metrics_text", "metrics_text", "plain_text"]

# How json writes numbers (float.__repr__ and int.__repr__ also for subclasses; only exact types come here).
_float_repr, _int_repr = float.__repr__, int.__repr__

#: The last event encoded, its line and the text of its plain ``metrics`` (None when not plain), swapped whole
#: so that a thread never pairs an event with another's text.
_last_event: tuple[Event | None, str, str | None] = (None, "", None)

#: Per event class: the text before its fields and each field's name with its ``,"name":`` key.
_LAYOUTS: dict[type, tuple[str, tuple[tuple[str, str], ...]] | None] = {}


def event_line(event: Event) -> str:
    """The event's line in the events stream: ``to_dict(event)`` as compact JSON, without the run id and
    experiment name its stream's header holds (``fedevents.engine.eventfile``); built once per event."""
    return _encoded(event)[1]


def event_metrics_text(event: Any) -> str | None:
    """``metrics_text(event.metrics)``, taken from the event's line when that was just written."""
    last = _last_event
    if last[0] is event:
        return last[2]
    metrics = event.metrics
    return metrics_text(metrics) if type(metrics) is MappingProxyType else None


def _encoded(event: Event) -> tuple[Event | None, str, str | None]:
    global _last_event
    last = _last_event
    if last[0] is not event:
        last = _last_event = (event, *_event_text(event))
    return last


def plain_text(value: Any) -> str | None:
    """``strict_json(value)`` of a str, int, finite float, bool or None (exact types); None for anything else."""
    kind = type(value)
    if kind is str:
        return _json_str(value)
    if kind is float:
        return _float_repr(value) if value - value == 0.0 else None  # inf - inf and nan - nan are nan
    if kind is int:
        return _int_repr(value)
    if kind is bool:
        return "true" if value else "false"
    return "null" if value is None else None


def metrics_text(mapping: Mapping[Any, Any]) -> str | None:
    """``strict_json(dict(mapping))`` of metrics (str names to exact ints and finite floats), or None for a
    mapping that holds anything else."""
    parts = []
    for name, value in mapping.items():
        kind = type(value)
        if type(name) is not str or not (kind is float and value - value == 0.0 or kind is int):
            return None
        parts.append(f"{_json_str(name)}:{_float_repr(value) if kind is float else _int_repr(value)}")
    return "{" + ",".join(parts) + "}"


def _layout(cls: type) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    fields = tuple(f.name for f in dataclasses.fields(cls))
    if "event" in fields or "schema" in fields:  # would replace to_dict's own keys: left to to_dict
        return None
    names = tuple(name for name in fields if name not in RUN_FIELDS)
    head = f'{{"event":{_json_str(cls.__name__)}'
    return head, tuple((name, f",{_json_str(name)}:") for name in names)


def _event_text(event: Event) -> tuple[str, str | None]:
    """``strict_json`` of ``to_dict(event)`` less ``RUN_FIELDS``, byte for byte, without the dict: the text of
    the plain fields (str, int, finite float, bool, None), of metrics and of tuples of names is written
    directly, the rest through ``json_safe``; and the text of its ``metrics`` when they are plain.

    This is the one encoding every event goes through (the events stream), 40 % of its cost as a dict.
    """
    cls = type(event)
    layout = _LAYOUTS.get(cls, False)
    if layout is False:
        layout = _LAYOUTS[cls] = _layout(cls)
    if layout is None:  # every field, the run's too: a line's own run fields win over its header's
        return strict_json(to_dict(event)), None
    head, keys = layout
    parts = [head]
    metrics = None
    for name, key in keys:
        value = getattr(event, name)
        kind = type(value)
        if kind is str:
            text = _json_str(value)
        elif kind is float and value - value == 0.0:
            text = _float_repr(value)
        elif kind is int:
            text = _int_repr(value)
        elif kind is bool:
            text = "true" if value else "false"
        elif value is None:
            text = "null"
        elif kind is MappingProxyType:
            plain = metrics_text(value)
            if name == "metrics":
                metrics = plain
            text = strict_json(json_safe(value)) if plain is None else plain
        elif kind is tuple and all(type(item) is str for item in value):  # tasks, clients
            text = "[" + ",".join(map(_json_str, value)) + "]"
        else:
            text = strict_json(json_safe(value))
        parts.append(key)
        parts.append(text)
    parts.append("}")
    return "".join(parts), metrics
