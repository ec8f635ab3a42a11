"""The PostgreSQL backend's housekeeping: expired data removed in bounded batches, queue
tables vacuumed, gauges read.

Reads never return expired data, so the sweep only frees room; one daemon at a time
does it (the ``sweep`` function skips when another holds its advisory lock).

Every delivery deletes a row, and a take walks the channel's index from its oldest
entry: entries of deleted rows stay there, and slow every take down, until a VACUUM
removes them. Autovacuum may be off, or wake only once a minute and then wait for a
fifth of the table to be dead; a queue turns its whole table over every few seconds.
So the sweeper VACUUMs a table of ours itself once enough of it is dead (``SKIP_LOCKED``:
another daemon's or autovacuum's run under way is enough). A role that may not vacuum
is told once, in the log, and left to autovacuum.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .base import BackendError, BackendStats

__all__ = ["SWEEP_BATCH", "SWEEP_INTERVAL_S", "Sweeper", "Vacuum"]

log = logging.getLogger("channels_broker.backends.postgres")

#: How often expired data is removed; reads never return it, so this only frees room.
SWEEP_INTERVAL_S = 1.0
#: Rows removed per statement and statements per sweep: bounds each transaction's
#: locks and a sweep's time, while still keeping up with 100,000 expiries a second.
SWEEP_BATCH = 1000
SWEEP_MAX_BATCHES = 100
#: Gauges are counted by full scans of two small tables: not more often than this.
STATS_INTERVAL_S = 10.0
#: A table is vacuumed once this many of its rows are dead, and more than
#: ``VACUUM_DEAD_FRACTION`` of it (so a large backlog is not rescanned for a few rows).
VACUUM_MIN_DEAD = 2000
VACUUM_DEAD_FRACTION = 0.1

#: Runs one statement with its arguments on a pooled connection, errors translated.
Fetch = Callable[..., Awaitable[Any]]
#: Runs one statement outside any transaction (VACUUM refuses to run inside one).
Execute = Callable[[str], Awaitable[Any]]


class Vacuum:
    """VACUUMs the tables of one schema whose dead rows passed the thresholds."""

    def __init__(self, fetch: Fetch, execute: Execute, schema: str, quoted_schema: str) -> None:
        self._fetch = fetch
        self._execute = execute
        self._schema = schema
        self._quoted = quoted_schema
        #: VACUUMs this daemon ran, by table name.
        self.runs: dict[str, int] = {}

    async def run(self) -> bool:
        """Vacuum what needs it; False once this role turns out not to be allowed to."""
        rows = await self._fetch(_DEAD_ROWS, self._schema)
        for table, dead, live in rows:
            if dead < VACUUM_MIN_DEAD or dead <= VACUUM_DEAD_FRACTION * (dead + live):
                continue
            try:
                await self._execute(f"VACUUM (SKIP_LOCKED) {self._quoted}.{table}")
            except BackendError as exc:
                if "permission" in str(exc) or "owner" in str(exc):
                    log.warning(
                        "cannot VACUUM %s.%s (%s): left to autovacuum; takes slow down "
                        "if it does not keep up",
                        self._schema,
                        table,
                        exc,
                    )
                    return False
                raise
            self.runs[table] = self.runs.get(table, 0) + 1
            log.debug("vacuumed %s.%s: %d dead rows", self._schema, table, dead)
        return True


#: The tables of a schema with their dead and live row counts (the statistics
#: collector's, which lag a second or so).
_DEAD_ROWS = """
    SELECT relname, n_dead_tup, n_live_tup FROM pg_stat_user_tables
    WHERE schemaname = $1 AND relname IN ('messages', 'takes', 'channels', 'groups')
"""


class Sweeper:
    """Sweeps every ``SWEEP_INTERVAL_S`` and keeps the last gauge reading."""

    def __init__(
        self, fetchrow: Fetch, sweep_sql: str, stats_sql: str, vacuum: Vacuum | None = None
    ) -> None:
        self._fetchrow = fetchrow
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
                if self._vacuum is not None and not await self._vacuum.run():
                    self._vacuum = None
                if time.monotonic() >= stats_due:
                    stats_due = time.monotonic() + STATS_INTERVAL_S
                    row = await self._fetchrow(self._stats_sql)
                    self.stats = BackendStats(row[0], row[1], row[2], row[3], 0)
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
