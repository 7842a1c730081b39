"""Whole-number method options (a count of batches or of exemplars), checked the way ``base.option`` is."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["count_option"]


def count_option(options: Mapping[str, Any], key: str, *, method: str, minimum: int = 0,
                 optional: bool = False) -> int | None:
    """A whole number from ``method_opts`` (None allowed when ``optional``); a one-line ValueError otherwise."""
    value = options.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"null or a whole number >= {minimum}" if optional else f"a whole number >= {minimum}"
        raise ValueError(f"method_opts.{key}: expected {allowed} for {method}, found {value!r}")
    return value
