"""The daemon's own bounds, on the side of the whole daemon: who may connect, and how a
bound that was hit is counted and logged.

Theory of operation. Every socket costs a file descriptor from the moment it is
accepted, HELLO or not. The daemon keeps its connections (``--max-connections``) under
what RLIMIT_NOFILE leaves after ``FD_RESERVE``, and one peer address under
``--max-connections-per-peer``, so that a flood of sockets is refused by us, with a
TOO_MANY_CONNECTIONS frame and a close before anything is read, and not by the kernel
(EMFILE) for everyone. Unix-socket peers have no address: they count against
``--max-connections`` only. Sockets that never say HELLO are closed after
``--hello-timeout`` (``Connection``).

If accept() fails anyway (descriptors used up elsewhere), asyncio pauses that listener
for a second and reports each failure to the loop's exception handler, with a
traceback; ``on_loop_exception`` counts those and logs one line per burst instead.

Every hit of a bound is counted (``Metrics.limits_hit``, by flag) and logged through a
``BurstLog``: the first hit, then at most one line per ``BURST_INTERVAL_S`` saying how
many came meanwhile, so that no client can fill the log.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from typing import Any

from broker.config import Config
from broker.ops.metrics import Metrics

__all__ = ["BURST_INTERVAL_S", "FD_RESERVE", "BurstLog", "Bounds"]

log = logging.getLogger("channels_broker.bounds")

#: File descriptors kept out of ``--max-connections``: listeners, the backend's own
#: connections (a PostgreSQL pool of 10 and its listener, Redis links), the metrics
#: listener and its scrapes, logs, the loop's selector and self-pipe, and the sockets of
#: one accept burst (asyncio accepts up to 100 per loop pass) refused but not yet closed.
FD_RESERVE = 160
#: Seconds between two log lines of one kind of hit: one line per burst.
BURST_INTERVAL_S = 10.0
#: The accept() errors that mean "out of descriptors or memory" (asyncio's own list).
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_FAILED = "socket.accept() out of system resource"


class BurstLog:
    """Warnings of one kind: the first at once, then one per ``interval_s`` with a count."""

    __slots__ = ("_interval_s", "_log", "_logged_at", "_unlogged")

    def __init__(self, interval_s: float = BURST_INTERVAL_S, logger: logging.Logger = log) -> None:
        self._interval_s = interval_s
        self._log = logger
        self._logged_at = -interval_s
        self._unlogged = 0

    def event(self, message: str) -> None:
        """Log ``message`` now, or count it for the next line if one was logged lately."""
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < self._interval_s:
            return
        more = self._unlogged - 1
        suffix = f" (and {more} more like it in the last {self._interval_s:g} s)" if more else ""
        self._log.warning("%s%s", message, suffix)
        self._logged_at = now
        self._unlogged = 0


class Bounds:
    """Connection counts of one daemon, and the counting and logging of every hit."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.metrics = metrics
        self.max_connections = config.max_connections
        self.max_per_peer = config.max_connections_per_peer
        self.connections = 0
        self._by_peer: dict[str, int] = {}
        self._logs: dict[str, BurstLog] = {}

    def hit(self, flag: str, message: str) -> None:
        """Count a hit of the bound ``flag`` (``max-pulls``...) and log ``message``."""
        self.metrics.limits_hit[flag] += 1
        self.notice(flag, message)

    def notice(
        self,
        kind: str,
        message: str,
        interval_s: float = BURST_INTERVAL_S,
        logger: logging.Logger = log,
    ) -> None:
        """Log ``message`` through the ``BurstLog`` of ``kind`` (made with ``interval_s``
        and ``logger`` on first use): one line per burst, whoever causes it."""
        burst = self._logs.get(kind)
        if burst is None:
            burst = self._logs[kind] = BurstLog(interval_s, logger)
        burst.event(message)

    # -- connections ---------------------------------------------------------

    def fit_file_limit(self) -> None:
        """Raise RLIMIT_NOFILE's soft limit as far as the connections need (the hard
        limit allows); lower ``max_connections`` to what it leaves, saying so."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.max_connections + FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < wanted:
            raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
            except (OSError, ValueError) as exc:
                log.warning("could not raise the open file limit to %d: %s", raised, exc)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            allowed = max(1, soft - FD_RESERVE)
            log.warning(
                "--max-connections %d lowered to %d: the open file limit is %d and %d are "
                "kept for listeners, the backend and accepts in flight (raise LimitNOFILE=)",
                self.max_connections,
                allowed,
                soft,
                FD_RESERVE,
            )
            self.max_connections = allowed

    def admit(self, peer_host: str | None) -> str | None:
        """Count a new connection from ``peer_host`` (None: a unix socket), or say why not."""
        if self.connections >= self.max_connections:
            reason = f"the daemon holds {self.connections} connections (--max-connections)"
            self.hit("max-connections", f"refused a connection: {reason}")
            return reason
        if peer_host is not None:
            count = self._by_peer.get(peer_host, 0)
            if count >= self.max_per_peer:
                reason = f"{peer_host} holds {count} connections (--max-connections-per-peer)"
                self.hit("max-connections-per-peer", f"refused a connection: {reason}")
                return reason
            self._by_peer[peer_host] = count + 1
        self.connections += 1
        return None

    def release(self, peer_host: str | None) -> None:
        """Uncount a connection ``admit`` let in."""
        self.connections -= 1
        if peer_host is not None:
            count = self._by_peer[peer_host] - 1
            if count:
                self._by_peer[peer_host] = count
            else:
                del self._by_peer[peer_host]

    def on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's exception handler: a failed accept is counted and logged once per
        burst; anything else goes to asyncio's default handler."""
        exc = context.get("exception")
        failed_accept = context.get("message") == _ACCEPT_FAILED
        if failed_accept and isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            self.metrics.accept_errors += 1
            burst = self._logs.get("accept")
            if burst is None:
                burst = self._logs["accept"] = BurstLog()
            burst.event(f"cannot accept connections: {exc.strerror}; listening again in 1 s")
            return
        loop.default_exception_handler(context)
