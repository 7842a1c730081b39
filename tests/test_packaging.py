"""The wheel installs fedevents.engine / .handlers / .federated and nothing with a generic top-level name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_the_namespace_subpackages_only(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    wheel = next(tmp_path.glob("fedevents-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "fedevents" in tops
    assert not {"engine", "handlers", "federated", "cli", "tests", "benchmarks"} & tops
    for module in ("fedevents/engine/bus.py", "fedevents/cli/main.py", "fedevents/handlers/clientwork.py",
                   "fedevents/handlers/executors/process.py",
                   "fedevents/federated/__init__.py", "fedevents/federated/methods/__init__.py",
                   "fedevents/federated/methods/fedprox.py"):
        assert module in names
    assert "fedevents/__init__.py" not in names  # fedevents is a namespace package
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fedevents = fedevents.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_every_source_module_is_in_the_wheel(tmp_path: Path) -> None:
    """A subpackage missing from pyproject's package list would be absent from a non-editable install."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    names = set(zipfile.ZipFile(next(tmp_path.glob("fedevents-*.whl"))).namelist())
    for folder in ("engine", "handlers", "federated", "cli"):
        for source in (ROOT / folder).rglob("*.py"):
            inside = source.relative_to(ROOT / folder).as_posix()
            assert f"fedevents/{folder}/{inside}" in names, f"{folder}/{inside} is not in the wheel"
