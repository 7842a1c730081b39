"""One error hierarchy: what the CLI turns into a single line and an exit status."""

from __future__ import annotations

__all__ = ["FedEventsError", "ConfigError", "DeviceError", "RunFailed", "HandlerLoadError", "Interrupted",
           "CheckpointError", "OutputError", "HandlerFailed", "describe", "message", "one_line"]


class FedEventsError(Exception):
    """Base of every error fedevents reports to a user as one line."""

    exit_status = 2


class ConfigError(FedEventsError):
    """An experiment file, an override or a flag is not what fedevents expects.

    The message names where (file and key path), what was expected and what was found.
    """


class DeviceError(ConfigError):
    """A configured device does not exist on this machine."""


class CheckpointError(ConfigError):
    """A checkpoint cannot be used: missing pieces, corrupt, unsafe to load, or from another config."""


class HandlerLoadError(ConfigError):
    """A ``handlers:`` entry could not be imported or built."""


class RunFailed(FedEventsError):
    """The experiment started but could not finish (a client failed under the ``fail`` policy)."""

    exit_status = 1


class OutputError(RunFailed):
    """A file of the run (record, log, events, trace) could not be written: a full disk, a read-only one.

    The run stops at once, before the round's checkpoint, so ``--resume`` repeats what was not recorded.
    """


class HandlerFailed(RuntimeError):
    """A handler raised ``SystemExit`` or ``KeyboardInterrupt`` of its own: that handler's failure, not the
    process's end."""


class Interrupted(FedEventsError):
    """SIGINT or SIGTERM stopped the run; exit status 130 or 143, as a shell reports a signal."""

    def __init__(self, signal_name: str, round: int, last_checkpoint: int) -> None:
        where = f"the checkpoint after round {last_checkpoint}" if last_checkpoint >= 0 else "the beginning"
        super().__init__(f"interrupted by {signal_name} in round {round}; "
                         f"the same command with --resume continues from {where}")
        self.signal_name = signal_name
        self.exit_status = 143 if signal_name == "SIGTERM" else 130


def describe(exc: BaseException) -> str:
    """``exc`` as ``Type: message`` on one printable line: how an error raised by code that is not
    fedevents' own (a user's handler, method or model) is reported, whatever its message holds."""
    return one_line(f"{type(exc).__name__}: {message(exc)}")


def message(exc: BaseException) -> str:
    """``str(exc)``, or a note saying it could not be read: a ``__str__`` that fails must not turn one
    failure into another."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - whatever it raises
        return "(its message could not be read)"


def one_line(text: str) -> str:
    """``text`` with line breaks, terminal escapes and other unprintable characters written as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
