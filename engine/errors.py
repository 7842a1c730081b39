"""One error hierarchy: what the CLI turns into a single line and an exit status."""

from __future__ import annotations

__all__ = ["FedEventsError", "ConfigError", "DeviceError", "RunFailed", "HandlerLoadError"]


class FedEventsError(Exception):
    """Base of every error fedevents reports to a user as one line."""

    exit_status = 2


class ConfigError(FedEventsError):
    """An experiment file, an override or a flag is not what fedevents expects.

    The message names where (file and key path), what was expected and what was found.
    """


class DeviceError(ConfigError):
    """A configured device does not exist on this machine."""


class HandlerLoadError(ConfigError):
    """A ``handlers:`` entry could not be imported or built."""


class RunFailed(FedEventsError):
    """The experiment started but could not finish (a client failed under the ``fail`` policy)."""

    exit_status = 1
