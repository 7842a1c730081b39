"""Repeats and sweeps: one experiment run per seed and per combination of swept values, as one group.

``--seeds 0 1 2`` and ``--sweep optimizer_opts.lr=0.1,0.01`` (repeatable) expand one experiment file into
the product of their values. Each run gets its own ``exp_name`` (the file's, plus a suffix naming its
values, so each has its own record, checkpoints and ``--resume``) and the shared ``group`` id, which its
record carries in ``config.group``; ``fedevents report`` groups runs that differ only in their seed.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Sequence

from fedevents.engine.config import parse_override
from fedevents.engine.errors import ConfigError

__all__ = ["Variant", "expand", "split_values"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Variant:
    """One run of a group: the suffix of its experiment name and its labelled overrides."""

    suffix: str
    overrides: tuple[tuple[str, str], ...]


def split_values(text: str) -> list[str]:
    """The comma-separated values of a sweep, commas inside brackets, braces or quotes kept."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values


def expand(seeds: Sequence[int] | None, sweeps: Sequence[str]) -> list[Variant]:
    """Every combination of ``seeds`` and the swept values, in the order given; [] when neither is given."""
    axes: list[list[tuple[str, str, str]]] = []  # per axis: (suffix part, label, override)
    if seeds:
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds: expected distinct seeds, found {list(seeds)}")
        axes.append([(f"seed{s}", "--seeds", f"random_seed={s}") for s in seeds])
    for sweep in sweeps:
        key, sep, text = sweep.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise ConfigError(f"--sweep {sweep}: expected KEY.PATH=VALUE,VALUE,..., found no '=' or no values")
        values = [v for v in split_values(text) if v]
        if len(values) != len(set(values)):
            raise ConfigError(f"--sweep {key}: expected distinct values, found {values}")
        name = key.strip().rsplit(".", 1)[-1]
        axis = []
        for value in values:
            parse_override(f"{key.strip()}={value}", f"--sweep {key.strip()}")  # a bad value fails here, in one line
            axis.append((f"{name}{_UNSAFE.sub('_', value)}"[:40], f"--sweep {key.strip()}", f"{key.strip()}={value}"))
        axes.append(axis)
    if not axes:
        return []
    return [Variant("-".join(part for part, _, _ in combo), tuple((label, o) for _, label, o in combo))
            for combo in itertools.product(*axes)]
