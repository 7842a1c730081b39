"""What the ``fedevents`` command imports before anything else, and how."""

from __future__ import annotations

import importlib
import sys

__all__ = ["import_structlog"]


def import_structlog() -> None:
    """Import structlog without letting it load rich.

    structlog's console renderer imports rich's traceback renderer (with pygments and attrs) whenever rich is
    installed, for tracebacks drawn on a terminal: 50-100 ms of every start of the command (docs/benchmarks.md).
    The command's console lines carry no tracebacks (an error is one line; ``--debug`` prints Python's), so it
    is left out. rich itself stays importable: the live progress display imports it when it draws. A process
    that imported structlog or rich already is left as it is.
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError while this stands
    try:
        importlib.import_module("structlog")
        return
    except ImportError:
        # A structlog that needs rich: forget the half-imported modules and import it as it comes.
        for name in [n for n in sys.modules if n == "structlog" or n.startswith("structlog.")]:
            del sys.modules[name]
    finally:
        del sys.modules["rich"]
    importlib.import_module("structlog")
