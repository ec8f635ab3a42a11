"""channels-broker: the Channels layer (``broker.layer``), the daemon (``broker.daemon``),
operations (``broker.ops``), the benchmark (``broker.bench``) and the command (``broker.cli``).

Importing ``broker`` loads none of them: a Django process that imports ``broker.layer``
must not pay for the daemon.
"""

from __future__ import annotations

from .errors import BrokerError, ConfigError
from .version import __version__

__all__ = ["BrokerError", "ConfigError", "__version__"]
