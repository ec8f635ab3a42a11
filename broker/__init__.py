"""The channels-broker daemon: server, connections, routing, configuration and CLI.

``broker.layer`` (the Channels layer class) and ``broker.cli`` are imported on
their own; importing ``broker`` loads neither Django nor Channels.
"""

from __future__ import annotations

from .config import Config
from .errors import BrokerError, ConfigError
from .server import Server
from .version import __version__

__all__ = ["BrokerError", "Config", "ConfigError", "Server", "__version__"]
