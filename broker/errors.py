"""Exceptions of the daemon package."""

from __future__ import annotations

__all__ = ["BrokerError", "ConfigError"]


class BrokerError(Exception):
    """Base of the daemon's own errors."""


class ConfigError(BrokerError):
    """A configuration value is not valid; the message says which and why."""
