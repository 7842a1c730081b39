"""The fedevents engine: events, bus, device pool, config and the run loop (knows no torch, no handlers)."""

from .bus import ALL, EventBus, Subscription
from .config import ExperimentConfig, load_experiment, load_experiments
from .context import RunContext
from .devices import DevicePool, Slot
from .errors import CheckpointError, ConfigError, DeviceError, FedEventsError, HandlerLoadError, Interrupted, RunFailed
from .events import *  # noqa: F403 - the event classes are the public vocabulary
from .events import __all__ as _event_names
from .eventfile import read_events
from .experiment import Experiment, ResumePoint, RunPaths
from .results import RoundMetrics, RunResult
from .runner import Engine

__all__ = [
    "ALL",
    "EventBus",
    "Subscription",
    "ExperimentConfig",
    "load_experiment",
    "load_experiments",
    "RunContext",
    "DevicePool",
    "Slot",
    "ConfigError",
    "DeviceError",
    "FedEventsError",
    "HandlerLoadError",
    "RunFailed",
    "Interrupted",
    "CheckpointError",
    "Experiment",
    "ResumePoint",
    "RoundMetrics",
    "RunResult",
    "RunPaths",
    "Engine",
    "read_events",
    *_event_names,
]
