"""What one layer knows of its daemon's reachability, shared by all its event loops.

Two uses. A call that finds no daemon fails at once, unless the daemon was reachable a
moment ago (within ``connect_timeout``): then it is restarting, and the call waits for it.
And an outage is logged once, when a connect first fails, and once more when a connect
succeeds again, however many loops and reconnect rounds meet it in between.

The loops of one layer run in different threads (``async_to_sync`` makes a loop per
call from sync code), hence the lock.
"""

from __future__ import annotations

import logging
import threading
import time

from protocol import PROTOCOL_VERSION

from .errors import BrokerUnavailable

__all__ = ["Outages"]

log = logging.getLogger("channels_broker.layer")


class Outages:
    """The moments a layer last knew its daemon alive, and whether it is down now."""

    def __init__(self, restart_grace_s: float, backoff_cap_s: float) -> None:
        #: How long after the daemon was last seen alive a refused connect is retried.
        self.restart_grace_s = restart_grace_s
        self._backoff_cap_s = backoff_cap_s
        self._lock = threading.Lock()
        self._alive_at: float | None = None  # time.monotonic(), as the loops' clocks
        self._down_since: float | None = None
        #: The protocol version HELLO says: lowered, for every loop of the layer, once a
        #: daemon older than the layer refuses it (``LoopClient._older_daemon``).
        self.version = PROTOCOL_VERSION

    def saw_alive(self) -> None:
        """A connection to the daemon was alive until now (it ended, or was handed on)."""
        with self._lock:
            self._alive_at = time.monotonic()

    def is_restarting(self) -> bool:
        """True if the daemon was alive less than ``restart_grace_s`` ago: a connect
        that fails now meets a restart, and is worth retrying for a while."""
        alive_at = self._alive_at
        return alive_at is not None and time.monotonic() - alive_at < self.restart_grace_s

    def reached(self, where: str) -> None:
        """A connect succeeded; logs the end of an outage, if there was one."""
        now = time.monotonic()
        with self._lock:
            self._alive_at = now
            down_since, self._down_since = self._down_since, None
        if down_since is not None:
            log.info("the broker is reachable again at %s, after %.1f s", where, now - down_since)

    def unreachable(self, error: BrokerUnavailable) -> None:
        """A connect round failed with ``error``; logs the start of an outage, once."""
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
        if first:
            log.warning(
                "%s. Until it is back, receive() waits and reconnects (retrying every %g s at"
                " most); send() and group_send() raise %s",
                error,
                self._backoff_cap_s,
                type(error).__name__,
            )
