"""Exceptions of the daemon package."""

from __future__ import annotations

__all__ = ["BrokerError", "ConfigError", "ListenError"]


class BrokerError(Exception):
    """Base of the daemon's own errors."""


class ConfigError(BrokerError):
    """A configuration value is not valid; the message says which and why.

    ``option`` names the ``serve`` option at fault (``"listen"``), when one is: the CLI
    then adds where its value came from (the flag, the environment or the TOML file).
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class ListenError(BrokerError):
    """A listener could not be opened: the message names the address and why, and
    ``option`` the ``serve`` option that gave the address (``"listen"``, ``"unix"``,
    ``"metrics-listen"``)."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option
