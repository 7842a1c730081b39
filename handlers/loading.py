"""Building user handlers named in a config's ``handlers:`` list.

An entry is ``"package.module:Name"`` or ``{target: "package.module:Name", kwargs: {...}}``. ``Name`` is
looked up in the imported module (a module in the config file's own folder is found too); a class is called with ``kwargs``, a function is used as it is (and may
take no kwargs). The result is wired to the bus in one of two ways: an object with a ``subscribe(bus)``
method subscribes itself; any other callable is subscribed to the event types in its ``events``
attribute, or to every event. Importing runs the module's code: a config is as trusted as a script.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

from fedevents.engine.bus import ALL, EventBus, Subscription
from fedevents.engine.errors import HandlerLoadError, describe
from fedevents.federated.registry import importable

__all__ = ["load_handler", "attach_handler"]


def load_handler(entry: str | Mapping[str, Any], where: str = "handlers", *, config_dir: Path | None = None) -> Any:
    """Import and build the handler an entry names; any failure is a one-line HandlerLoadError."""
    target, kwargs = (entry, {}) if isinstance(entry, str) else (entry["target"], dict(entry.get("kwargs") or {}))
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerLoadError(f"{where}: expected 'package.module:Name', found {target!r}")
    try:
        with importable(config_dir):
            module = importlib.import_module(module_name)
    except BaseException as exc:
        _pass_interrupt(exc)
        raise HandlerLoadError(f"{where}: could not import {module_name!r}: {describe(exc)}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise HandlerLoadError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type) or kwargs:
        try:
            obj = obj(**kwargs)
        except BaseException as exc:
            _pass_interrupt(exc)
            raise HandlerLoadError(f"{where}: {target}(**{kwargs!r}) failed: {describe(exc)}") from exc
    if not callable(obj) and not hasattr(obj, "subscribe"):
        raise HandlerLoadError(f"{where}: expected {target} to be callable or to have subscribe(bus), found {type(obj).__name__}")
    return obj


def attach_handler(handler: Any, bus: EventBus, where: str = "handlers") -> list[Subscription]:
    """Subscribe a built handler: ``handler.subscribe(bus)`` if it has one, else to ``handler.events`` or all.

    Whatever a handler's ``subscribe`` raises (``SystemExit`` too) is a one-line HandlerLoadError.
    """
    if hasattr(handler, "subscribe") and callable(handler.subscribe):
        try:
            return list(handler.subscribe(bus) or [])
        except BaseException as exc:
            _pass_interrupt(exc)
            raise HandlerLoadError(f"{where}: {type(handler).__name__}.subscribe(bus) failed: {describe(exc)}") from exc
    return [bus.subscribe(getattr(handler, "events", ALL), handler)]


def _pass_interrupt(exc: BaseException) -> None:
    # Before the run, SIGINT still raises KeyboardInterrupt: it may be the user's Ctrl-C, so it goes on.
    if isinstance(exc, KeyboardInterrupt):
        raise exc
