"""systemd's notify protocol: readiness, status, watchdog and stopping, standard library only.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a datagram socket; each
datagram is newline-separated ``KEY=value`` lines (``READY=1``, ``STATUS=...``,
``WATCHDOG=1``, ``STOPPING=1``). A name starting with ``@`` is in the abstract
namespace (a leading NUL byte). With ``WatchdogSec=`` it also passes
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process meant): the service must
send ``WATCHDOG=1`` more often than that or be killed and restarted. We send it
from a timer of the event loop at half the period, so a wedged loop, the failure
that matters, stops the pings. Without ``$NOTIFY_SOCKET`` every method does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

__all__ = ["STATUS_INTERVAL_S", "Notifier"]

log = logging.getLogger("channels_broker.systemd")

#: Seconds between STATUS= refreshes when no watchdog asks for a faster beat: often
#: enough for ``systemctl status`` to look live, rare enough to cost nothing.
STATUS_INTERVAL_S = 10.0


class Notifier:
    """Talks to systemd when started by it; a no-op otherwise."""

    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        """``address``: the ``$NOTIFY_SOCKET`` value; ``watchdog_s``: the watchdog period."""
        self._address = _socket_address(address) if address else None
        self._watchdog_s = watchdog_s
        self._socket: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._describe: Callable[[], str] | None = None
        self._last_status = ""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC``, if set (and meant for us)."""
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog_s = None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd watches; a child that inherited it is not it.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1_000_000
        return cls(address, watchdog_s)

    @property
    def is_enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> None:
        """Send one datagram of ``KEY=value`` lines; failures are logged, never raised."""
        if self._address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            # systemd gone or its queue full: the service still runs, only unobserved.
            log.warning("cannot notify systemd at %s: %s", self._address, exc)

    def ready(self, describe: Callable[[], str]) -> None:
        """READY=1 with a first STATUS=; then keep the watchdog fed and the status fresh.

        Call from the event loop once every listener and the backend are up;
        ``describe`` returns the status line (connections, backlog).
        """
        if self._address is None:
            return
        self._describe = describe
        self._last_status = describe()
        self.notify("READY=1", f"STATUS={self._last_status}")
        self._schedule()

    def stopping(self, status: str) -> None:
        """STOPPING=1: systemd shows the unit as deactivating while we finish."""
        self._describe = None  # the status line says why we stop; keep it shown
        self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        """Stop the timer and close the socket. The watchdog must be fed until now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _interval_s(self) -> float:
        if self._watchdog_s is None:
            return STATUS_INTERVAL_S
        # Half the period, as sd_watchdog_enabled(3) advises: one late tick is no restart.
        return min(self._watchdog_s / 2, STATUS_INTERVAL_S)

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._interval_s(), self._tick)

    def _tick(self) -> None:
        lines = ["WATCHDOG=1"] if self._watchdog_s is not None else []
        if self._describe is not None:
            status = self._describe()
            if status != self._last_status:
                self._last_status = status
                lines.append(f"STATUS={status}")
        if lines:
            self.notify(*lines)
        self._schedule()


def _socket_address(value: str) -> str | None:
    """The address to ``sendto``: a path, or an abstract name (``@`` becomes NUL)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd 254+ may pass vsock:... addresses; we do not speak that transport.
    log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an abstract socket name", value)
    return None
