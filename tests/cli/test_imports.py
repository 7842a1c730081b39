"""The command's start: structlog imported without rich (cli/imports.py)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import fedevents.cli
import structlog.dev
assert "rich" not in sys.modules, "rich was imported"
assert structlog.dev.rich is None
from rich.console import Console  # rich itself is still there for the progress display
print("ok")
"""

ALREADY = """
import sys
import rich
import fedevents.cli
import structlog.dev
assert structlog.dev.rich is rich  # a process that loaded rich first keeps structlog's use of it
print("ok")
"""


def test_the_command_imports_structlog_without_rich_and_rich_stays_importable() -> None:
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_a_process_that_imported_rich_first_is_left_as_it_is() -> None:
    run = subprocess.run([sys.executable, "-c", ALREADY], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_a_structlog_that_needs_rich_is_imported_as_it_comes(monkeypatch) -> None:
    """If a structlog version imported rich unguarded, the lean import must fall back, not fail the command."""
    from fedevents.cli import imports

    calls = []

    def fake_import(name: str):
        calls.append((name, sys.modules.get("rich", "absent")))
        if len(calls) == 1:
            sys.modules["structlog.fake_half"] = object()  # a module the failed import left behind
            raise ImportError("No module named 'rich'")
        return object()

    for name in [n for n in sys.modules if n == "structlog" or n.startswith("structlog.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "rich", raising=False)
    monkeypatch.setattr(imports.importlib, "import_module", fake_import)
    imports.import_structlog()
    assert calls == [("structlog", None), ("structlog", "absent")]
    assert "structlog.fake_half" not in sys.modules and "rich" not in sys.modules
