"""fedevents handlers: work handlers (real and simulated) and the default sinks."""

from .dryrun import SimulatedWork
from .logsink import LogSink, configure_logging
from .recorder import JsonRecorder
from .trace import TraceRecorder
from .work import WorkHandlers

__all__ = ["JsonRecorder", "LogSink", "SimulatedWork", "TraceRecorder", "WorkHandlers", "configure_logging"]
