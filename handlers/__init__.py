"""fedevents handlers: the client-work handler over its executors, checkpoints, and the default sinks."""

from .clientwork import ClientTimeout, ClientWork
from .logsink import LogSink, configure_logging
from .recorder import JsonRecorder
from .trace import TraceRecorder

__all__ = ["ClientTimeout", "ClientWork", "JsonRecorder", "LogSink", "TraceRecorder", "configure_logging"]
