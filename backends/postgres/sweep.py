"""The PostgreSQL backend's housekeeping: expired data removed in bounded batches, gauges
read, and the queue tables vacuumed (``vacuum``).

Reads never return expired data, so the sweep only frees room; one daemon at a time
does it (the ``sweep`` function skips when another holds its advisory lock).
"""

from __future__ import annotations

import asyncio
import logging
import time

from backends import BackendError, BackendStats

from .vacuum import Fetch, Vacuum

__all__ = ["SWEEP_BATCH", "SWEEP_INTERVAL_S", "Sweeper"]

log = logging.getLogger("channels_broker.backends.postgres")

#: How often expired data is removed; reads never return it, so this only frees room.
SWEEP_INTERVAL_S = 1.0
#: Rows removed per statement and statements per sweep: bounds each transaction's
#: locks and a sweep's time, while still keeping up with 100,000 expiries a second.
SWEEP_BATCH = 1000
SWEEP_MAX_BATCHES = 100
#: Gauges are counted by full scans of two small tables: not more often than this.
STATS_INTERVAL_S = 10.0


class Sweeper:
    """Sweeps every ``SWEEP_INTERVAL_S`` and keeps the last gauge reading."""

    def __init__(
        self,
        fetchrow: Fetch,
        sweep_sql: str,
        stats_sql: str,
        vacuum: Vacuum | None = None,
        *,
        forget_sql: str = "",
    ) -> None:
        self._fetchrow = fetchrow
        #: Removes what else lapsed (records of numbered sends), once a sweep.
        self._forget_sql = forget_sql
        self._sweep_sql = sweep_sql
        self._stats_sql = stats_sql
        self._vacuum = vacuum
        #: Where the walk through channel rows goes on from (a name, in order).
        self._after = ("", "")
        self.stats = BackendStats(0, 0, 0, 0, 0)
        #: Expired messages this daemon's sweeps removed.
        self.expired_total = 0

    async def run_forever(self) -> None:
        stats_due = 0.0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.sweep()
                if time.monotonic() >= stats_due:
                    stats_due = time.monotonic() + STATS_INTERVAL_S
                    row = await self._fetchrow(self._stats_sql)
                    self.stats = BackendStats(row[0], row[1], row[2], row[3], 0)
                if self._vacuum is not None:
                    await self._vacuum.run()
            except BackendError as exc:
                log.debug("sweep failed: %s", exc)

    async def sweep(self) -> None:
        """Batches until one comes back short (or ``SWEEP_MAX_BATCHES``)."""
        for _ in range(SWEEP_MAX_BATCHES):
            row = await self._fetchrow(self._sweep_sql, SWEEP_BATCH, *self._after)
            self.expired_total += row["expired"]
            self._after = (row["next_ns"] or "", row["next_channel"] or "")
            if max(row["expired"], row["lapsed"]) < SWEEP_BATCH:
                break
        if self._forget_sql:
            await self._fetchrow(self._forget_sql)
