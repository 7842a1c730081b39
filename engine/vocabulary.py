"""The names a config may use for its components, and the options each reads, as the registries declare them.

The engine knows no method, model or optimizer: the composition root hands ``load_experiments`` a
``Vocabulary`` (one ``Catalogue`` per kind of component) built from the registries in
``fedevents.federated``. A catalogue answers two questions: which names it holds (for a did-you-mean)
and what one name, or a user's ``"package.module:Name"``, is (``describe``). Options are declared by their
defaults: an option whose default is a float takes any number, an int a whole number, a bool true or
false, a string a string, a list a list; ``None`` takes anything (the component checks it when built).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from .schema import Anything, Bool, Float, Int, ListOf, Spec, Str

__all__ = ["Plugin", "Catalogue", "Vocabulary", "KINDS", "option_spec"]

#: The kinds of component a config names, as the keys of a Vocabulary.
KINDS = ("methods", "models", "datasets", "criteria", "optimizers", "schedulers")


class Plugin(Protocol):
    """One component a config can name: its name, the options it reads (with defaults) and other spellings.

    ``aliases`` maps another name of an option (FedSTIL's, say) to ``(option, factor)``: the value given
    under the alias, times ``factor``, is the option's value. An alias to None is accepted and has no
    effect (an option the original read but never used). ``tags`` say what it fits with (a model tagged
    ``reid`` is a ReID backbone; a data set tagged ``reid`` needs one).
    """

    name: str
    options: Mapping[str, Any]
    aliases: Mapping[str, tuple[str, float] | None]
    tags: frozenset[str]


class Catalogue(Protocol):
    """The components of one kind: built-in names, and user plugins named ``"package.module:Name"``."""

    def names(self) -> Sequence[str]:
        """The built-in names, for messages."""

    def describe(self, name: str, config_dir: Path | None) -> Plugin:
        """What ``name`` is; a ValueError whose message completes "expected ..., found ..." if it is nothing."""


@dataclass(frozen=True)
class Vocabulary:
    """One catalogue per kind in ``KINDS``; a kind left out accepts any name with any options."""

    catalogues: Mapping[str, Catalogue] = field(default_factory=dict)

    def describe(self, kind: str, name: str, config_dir: Path | None) -> Plugin | None:
        """The component ``name`` of ``kind``, or None when no catalogue of that kind was given."""
        catalogue = self.catalogues.get(kind)
        return None if catalogue is None else catalogue.describe(name, config_dir)

    def names(self, kind: str) -> Sequence[str]:
        catalogue = self.catalogues.get(kind)
        return () if catalogue is None else tuple(catalogue.names())


def option_spec(default: Any) -> Spec:
    """The spec an option's default implies (see the module docstring)."""
    if isinstance(default, bool):
        return Bool()
    if isinstance(default, int):
        return Int()
    if isinstance(default, float):
        return Float()
    if isinstance(default, str):
        return Str()
    if isinstance(default, (list, tuple)):
        item = option_spec(default[0]) if default and default[0] is not None else Anything()
        return ListOf(item)
    return Anything()
