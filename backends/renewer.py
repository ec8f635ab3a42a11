"""The task that keeps a daemon's leases alive: every third of a lease it renews what
the daemon holds, so a lease lapses only once the daemon stops (or dies).

Each set of leases (Redis: pushed messages, fan-out records, consumers' delivered
takes; PostgreSQL: pushed messages, consumers' delivered takes) keeps its own leases
and its own renewing script or statement; this is the loop they share.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .errors import BackendError

__all__ = ["Renewer"]


class Renewer:
    """Call ``renew_once`` every ``lease_s / 3`` seconds from ``start`` until ``stop``;
    a storage error is logged to ``log`` at ``level`` and the next round tries again."""

    def __init__(
        self,
        what: str,
        lease_s: float,
        renew_once: Callable[[], Awaitable[None]],
        log: logging.Logger,
        level: int = logging.INFO,
    ) -> None:
        self._what = what
        self._interval_s = lease_s / 3
        self._renew_once = renew_once
        self._log = log
        self._level = level
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start renewing (a no-op while it runs)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._renew_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        """``stop``, and wait until a round under way has ended (before the storage's
        connections close under it)."""
        task = self._task
        self.stop()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._renew_once()
            except BackendError as exc:
                self._log.log(self._level, "renewing %s failed: %s", self._what, exc)
