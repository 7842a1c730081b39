"""The C library's heap: one arena per process unless the user chose otherwise, free pages given back."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's parameters are glibc's")

_PROBE = ("from fedevents.federated.allocator import release_free_pages, share_one_heap; "
          "release_free_pages(1 << 30); print(share_one_heap())")


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.strip()


def test_a_process_shares_one_heap_unless_the_user_set_the_arena_count() -> None:
    assert _probe() == "True"
    assert _probe(MALLOC_ARENA_MAX="4") == "False"
