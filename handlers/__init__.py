"""fedevents handlers: work handlers (real and simulated) and the default sinks."""

from .dryrun import SimulatedWork
from .work import WorkHandlers

__all__ = ["SimulatedWork", "WorkHandlers"]
