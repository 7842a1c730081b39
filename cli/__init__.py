"""The composition root: build experiments from configs, the ``fedevents`` command and the offline report."""

from __future__ import annotations

from typing import Any

from .imports import import_structlog

import_structlog()  # before anything imports it: see imports.py

from .main import main  # noqa: E402

__all__ = ["build_executor", "build_experiment", "build_experiments", "main"]


def __getattr__(name: str) -> Any:
    # The builder imports torch; `fedevents report` and `fedevents --help` need not wait for it.
    if name in ("build_executor", "build_experiment", "build_experiments"):
        from . import builder

        return getattr(builder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
