"""The machine description every benchmark prints with its numbers."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    return (f"{cpu}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def compile_fedevents() -> str:
    """Compile fedevents' modules to bytecode where it is missing or stale (``make setup`` does the same), so
    a start-up measured here is an installed package's: an editable install under PYTHONDONTWRITEBYTECODE=1
    would otherwise compile every module at every start. Says what it did, for the benchmark's header."""
    import compileall
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folders = [root / name for name in ("engine", "federated", "handlers", "cli")]
    ok = all(compileall.compile_dir(str(folder), quiet=1) for folder in folders)
    flag = os.environ.get("PYTHONDONTWRITEBYTECODE") or "unset"
    return f"fedevents' bytecode {'up to date' if ok else 'NOT all compiled'} (PYTHONDONTWRITEBYTECODE={flag})"
