"""The one list of what a config may name: methods, models, data sets, criteria, optimizers, schedulers.

Each kind is a ``Catalogue`` of ``Component`` entries (a name, the options it reads with their defaults,
other spellings of options, tags). A config may also name a user's component as ``"package.module:Name"``
(a module in the config file's folder is found too); the class then declares its options the way built-ins
do: a ``defaults`` mapping (and optionally ``aliases`` and ``tags``). Importing runs the module's code: a
config is as trusted as a script. The composition root hands these catalogues to the config loader, so
the engine never imports this package.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

__all__ = ["Component", "Catalogue", "load_target", "is_target", "importable", "plugin_folders", "remember_folders"]

#: The folder each user module was imported from (module name -> folder), for the imports that name it
#: again without a folder: a worker process is handed this map (``remember_folders``) before it builds
#: anything, so a module next to the config file imports there too, whatever the process's working folder.
_FOLDERS: dict[str, str] = {}


@dataclass(frozen=True)
class Component:
    """What a config can say about one component: its options (by default value), aliases and tags."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    aliases: Mapping[str, tuple[str, float] | None] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    #: The object a ``"module:Name"`` named (a class), None for a built-in.
    target: Any = None


def is_target(name: str) -> bool:
    """Whether ``name`` is a ``"package.module:Name"`` rather than a built-in name."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr)


@dataclass(frozen=True)
class Catalogue:
    """The components of one kind: built-ins by name, and user classes by ``"module:Name"``.

    ``entries`` is called on every lookup, so names another module registers later are seen (the method
    registry is a dict that grows). ``check`` says why an imported object cannot be one of this kind.
    """

    kind: str
    entries: Callable[[], Mapping[str, Component]]
    check: Callable[[Any], str | None] = lambda obj: None
    #: The tags of a user's class that declares none (a user's model and data set are "small": a model
    #: built from a sample shape and a class count, and a data set that gives them).
    user_tags: frozenset[str] = frozenset()

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.entries()))

    def describe(self, name: str, config_dir: Path | None = None) -> Component:
        """The component ``name`` is; a ValueError ("expected ..., found ...") if it is none."""
        entries = self.entries()
        if name in entries:
            return entries[name]
        if is_target(name):
            obj = load_target(name, config_dir)
            problem = self.check(obj)
            if problem:
                raise ValueError(f"expected {problem}, found {name} ({type(obj).__name__})")
            return Component(name, dict(getattr(obj, "defaults", {}) or {}), dict(getattr(obj, "aliases", {}) or {}),
                             frozenset(getattr(obj, "tags", ()) or ()) or self.user_tags, obj)
        hint = difflib.get_close_matches(name, list(entries), n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"expected one of {', '.join(sorted(entries))} or 'package.module:Name', "
                         f"found {name!r} (string){extra}")


def load_target(target: str, config_dir: Path | None = None) -> Any:
    """The object ``"package.module:Name"`` names; ValueError in one line when it cannot be imported."""
    module_name, _, attr = target.partition(":")
    if config_dir is None and module_name in _FOLDERS:
        config_dir = Path(_FOLDERS[module_name])
    try:
        with importable(config_dir):
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"expected an importable module, found {module_name!r} "
                         f"({type(exc).__name__}: {exc})") from None
    _remember(module_name, module, config_dir)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"expected module {module_name!r} to define {attr!r}, found no such attribute")
        obj = getattr(obj, part)
    return obj


def _remember(module_name: str, module: Any, folder: Path | None) -> None:
    """Note ``folder`` for ``module_name`` if the module was found there (not in site-packages, say)."""
    file = getattr(module, "__file__", None)
    if folder is None or file is None:
        return
    folder = Path(folder).resolve()
    if Path(file).resolve().is_relative_to(folder):
        _FOLDERS[module_name] = str(folder)


def plugin_folders() -> dict[str, str]:
    """The folders user modules were imported from, by module name (what a worker process needs)."""
    return dict(_FOLDERS)


def remember_folders(folders: Mapping[str, str]) -> None:
    """Import the modules ``folders`` names from those folders when a config names them (a worker process)."""
    _FOLDERS.update(folders)


@contextmanager
def importable(folder: Path | None) -> Iterator[None]:
    """Let a module that sits next to its config be imported, for the import only; it stays in sys.modules."""
    if folder is None:
        yield
        return
    entry = str(Path(folder).resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)
