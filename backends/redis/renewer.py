"""The task that keeps a daemon's leases alive: every third of a lease it renews what
the daemon holds, so a lease lapses only once the daemon stops (or dies).

Pushed messages (``pushed``), fan-out records (``edge``) and consumers' delivered takes
(``leases``) each keep their own set of leases and their own renewing script; this is
the loop they share.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from backends import BackendError

__all__ = ["Renewer"]

log = logging.getLogger("channels_broker.backends.redis")


class Renewer:
    """Call ``renew_once`` every ``lease_s / 3`` seconds from ``start`` until ``stop``;
    a storage error is logged at ``level`` and the next round tries again."""

    def __init__(
        self,
        what: str,
        lease_s: float,
        renew_once: Callable[[], Awaitable[None]],
        level: int = logging.INFO,
    ) -> None:
        self._what = what
        self._interval_s = lease_s / 3
        self._renew_once = renew_once
        self._level = level
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start renewing (a no-op while it runs)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._renew_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._renew_once()
            except BackendError as exc:
                log.log(self._level, "renewing %s failed: %s", self._what, exc)
