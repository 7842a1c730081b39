"""Small typed specs that check one config value, fill defaults and say precisely what is wrong.

Every check raises ``SpecError(path, message)``; the loader adds the file name in front.
"""

from __future__ import annotations

import difflib
import math
import reprlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "SpecError",
    "Spec",
    "Int",
    "Float",
    "Str",
    "Bool",
    "ListOf",
    "Section",
    "AnyMapping",
    "Anything",
    "OneOf",
    "Field",
    "SAFE_NAME",
    "describe",
]

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: A number as text: YAML 1.1 (PyYAML) reads ``1e-3`` (no dot) as a string, which a user means as a number.
NUMERIC_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
MISSING: Any = object()


class SpecError(Exception):
    """A value at ``path`` does not fit its spec."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 50, 50


def describe(value: Any) -> str:
    """How a found value reads in a message: a short repr (never the whole of a huge value) and its type."""
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    name = kind.get(type(value), type(value).__name__)
    text = _SHORT.repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({name})" if value is not None else "nothing (null)"


class Spec:
    """Checks and normalises one value."""

    expected = "a value"

    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def fail(self, value: Any, path: str) -> SpecError:
        return SpecError(path, f"expected {self.expected}, found {describe(value)}")


@dataclass(frozen=True)
class Int(Spec):
    min: int | None = None

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "an integer" + (f" >= {self.min}" if self.min is not None else "")

    def check(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(value, path)
        if self.min is not None and value < self.min:
            raise self.fail(value, path)
        return value


@dataclass(frozen=True)
class Float(Spec):
    min: float | None = None
    positive: bool = False
    below: float | None = None

    @property
    def expected(self) -> str:  # type: ignore[override]
        bounds = []
        if self.positive:
            bounds.append("> 0")
        elif self.min is not None:
            bounds.append(f">= {self.min:g}")
        if self.below is not None:
            bounds.append(f"< {self.below:g}")
        return "a number" + (" " + " and ".join(bounds) if bounds else "")

    def check(self, value: Any, path: str) -> float:
        if isinstance(value, str) and NUMERIC_TEXT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(value, path)
        value = float(value)
        if not math.isfinite(value):  # NaN and infinities: numbers, but never a setting
            raise SpecError(path, f"expected a finite {self.expected.removeprefix('a ')}, found {describe(value)}")
        if self.positive and value <= 0:
            raise self.fail(value, path)
        if self.min is not None and value < self.min:
            raise self.fail(value, path)
        if self.below is not None and value >= self.below:
            raise self.fail(value, path)
        return value


@dataclass(frozen=True)
class Str(Spec):
    choices: Sequence[str] | None = None
    safe_name: bool = False
    nullable: bool = False

    @property
    def expected(self) -> str:  # type: ignore[override]
        if self.choices:
            return "one of " + ", ".join(sorted(self.choices))
        if self.safe_name:
            return "a name of letters, digits, '.', '_' or '-' (at most 128, not starting with '.' or '-')"
        return "a string"

    def check(self, value: Any, path: str) -> str | None:
        if value is None and self.nullable:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(value, path)
        if self.choices is not None and value not in self.choices:
            hint = difflib.get_close_matches(value, list(self.choices), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise SpecError(path, f"expected {self.expected}, found {describe(value)}{extra}")
        if self.safe_name and (not SAFE_NAME.match(value) or ".." in value):
            raise self.fail(value, path)
        return value


@dataclass(frozen=True)
class Bool(Spec):
    expected = "true or false"

    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(value, path)
        return value


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    min_len: int = 0
    max_len: int | None = None
    scalar_ok: bool = False  # a single item may stand for a one-item list

    @property
    def expected(self) -> str:  # type: ignore[override]
        size = f"at least {self.min_len} " if self.min_len else ""
        if self.max_len is not None:
            size = f"{self.min_len} to {self.max_len} "
        return f"a list of {size}items, each {self.item.expected}"

    def check(self, value: Any, path: str) -> list[Any]:
        if self.scalar_ok and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list):
            raise self.fail(value, path)
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            raise self.fail(value, path)
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Field:
    spec: Spec
    default: Any = MISSING


@dataclass(frozen=True)
class Section(Spec):
    """A mapping with known keys: unknown keys are refused with a 'did you mean', defaults filled.

    An ``open`` section passes other keys through unchecked, for a later check that knows them.
    """

    fields: Mapping[str, Field] = field(default_factory=dict)
    open: bool = False
    expected = "a mapping"

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(value, path)
        for key in value:
            if key not in self.fields and not self.open:
                where = _join(path, str(key))
                hint = difflib.get_close_matches(str(key), list(self.fields), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(self.fields)}"
                raise SpecError(where, f"unknown key{extra}")
        out: dict[str, Any] = {k: _copy(v) for k, v in value.items() if k not in self.fields}
        for key, fld in self.fields.items():
            where = _join(path, key)
            if key in value:
                out[key] = fld.spec.check(value[key], where)
            elif fld.default is MISSING:
                raise SpecError(where, f"missing; expected {fld.spec.expected}")
            elif isinstance(fld.spec, Section) and fld.default == {}:
                out[key] = fld.spec.check({}, where)
            else:
                out[key] = _copy(fld.default)
        return out


@dataclass(frozen=True)
class AnyMapping(Spec):
    expected = "a mapping"

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(value, path)
        return dict(value)


@dataclass(frozen=True)
class Anything(Spec):
    """Any value: the component that reads it checks it when it is built."""

    expected = "any value"

    def check(self, value: Any, path: str) -> Any:
        return _copy(value)


@dataclass(frozen=True)
class OneOf(Spec):
    """The first spec whose ``accepts`` says yes checks the value (a list form or a compact form)."""

    options: Sequence[tuple[Callable[[Any], bool], Spec]]
    expected_text: str = "a value"

    @property
    def expected(self) -> str:  # type: ignore[override]
        return self.expected_text

    def check(self, value: Any, path: str) -> Any:
        for accepts, spec in self.options:
            if accepts(value):
                return spec.check(value, path)
        raise self.fail(value, path)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
