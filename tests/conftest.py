"""Shared fixtures: every async test runs on both anyio backends."""

from __future__ import annotations

import os

import pytest

# As the fedevents command does (cli/main.py): one MKL code path whatever the matrices' alignment.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param
