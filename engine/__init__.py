"""The fedevents engine: events, bus, device pool, config, the run loop and the CLI's builder."""

from .bus import ALL, EventBus, Subscription
from .builder import build_experiment, build_experiments
from .config import ExperimentConfig, load_experiment, load_experiments
from .context import RunContext
from .devices import DevicePool, Slot
from .errors import CheckpointError, ConfigError, DeviceError, FedEventsError, HandlerLoadError, Interrupted, RunFailed
from .events import *  # noqa: F403 - the event classes are the public vocabulary
from .events import __all__ as _event_names
from .experiment import Experiment, RunPaths
from .runner import Engine

__all__ = [
    "ALL",
    "EventBus",
    "Subscription",
    "build_experiment",
    "build_experiments",
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
    "RunPaths",
    "Engine",
    *_event_names,
]
