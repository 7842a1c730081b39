"""Where client work runs: one executor class per ``executor:`` name, and the dry run's simulated clock."""

from __future__ import annotations

from .base import Executor, WorkerLost
from .process import ProcessExecutor
from .simulated import DryRunCheckpoints, SimulatedExecutor, SimulatedFederation
from .thread import ThreadExecutor

__all__ = [
    "DryRunCheckpoints",
    "Executor",
    "ProcessExecutor",
    "SimulatedExecutor",
    "SimulatedFederation",
    "ThreadExecutor",
    "WorkerLost",
]
