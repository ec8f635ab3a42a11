"""The PostgreSQL backend's VACUUM of its own queue tables.

Every delivery deletes a row, and a take walks the channel's index from its oldest
entry: entries of deleted rows stay there, and slow every take down, until a VACUUM
removes them. Autovacuum may be off, or wake once a minute and then wait for a fifth
of a table to be dead; a queue turns its table over every few seconds. So the sweeper
has ``Vacuum.run`` VACUUM a table of ours once enough of it is dead:

* one daemon at a time (a session advisory lock), on a connection of its own, closed
  after, so neither the lock nor a long VACUUM can outlive it or hold a pooled one;
* ``SKIP_LOCKED`` (autovacuum at work on the table is as good) and ``TRUNCATE false``
  (giving back the empty end of a drained table takes a lock that stops every send);
* a table at most once per ``VACUUM_COOLDOWN_S``, whatever the statistics say (they
  lag), and not at all where this role may not (PostgreSQL only warns in its own log
  then): that is said once, in our log, and the table left to autovacuum.

It ANALYZEs a table too once it holds far more rows than the planner believes (the
row count VACUUM or ANALYZE last saw): a queue table VACUUMed while empty looks empty
to the planner until then, and plans for an empty table join by nested loop and scan
where they should look up (a sweep of 20,000 channels took seconds).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

__all__ = ["Connect", "Fetch", "Vacuum"]

log = logging.getLogger("channels_broker.backends.postgres")

#: A table is vacuumed once this many of its rows are dead, and more than
#: ``VACUUM_DEAD_FRACTION`` of it (so a large backlog is not rescanned for a few rows).
VACUUM_MIN_DEAD = 2000
VACUUM_DEAD_FRACTION = 0.1
#: Seconds between two VACUUMs of one table by this daemon (tried or done).
VACUUM_COOLDOWN_S = 10.0
#: A table is ANALYZEd once it holds this many rows more than twice what the planner
#: believes it holds.
ANALYZE_MIN_GROWTH = 1000
#: A VACUUM of a queue table takes milliseconds; one still running after this is cut.
VACUUM_TIMEOUT_S = 60.0

#: Runs one statement with its arguments on a pooled connection, errors translated.
Fetch = Callable[..., Awaitable[Any]]
#: Opens a connection outside the pool.
Connect = Callable[[], Awaitable[Any]]

#: Our tables with their dead and live row counts (the statistics lag a second or so),
#: whether this role may vacuum them (owner, or superuser), and how many rows the
#: planner believes they hold (-1: never counted).
_DEAD_ROWS = """
    SELECT s.relname, s.n_dead_tup, s.n_live_tup,
           pg_has_role(current_user, c.relowner, 'USAGE')
           OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
           c.reltuples
    FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
    WHERE s.schemaname = $1 AND s.relname IN ('messages', 'takes', 'channels', 'groups')
"""

_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class Vacuum:
    """VACUUMs the tables of one schema whose dead rows passed the thresholds."""

    def __init__(self, fetch: Fetch, connect: Connect, schema: str, quoted_schema: str) -> None:
        self._fetch = fetch
        self._connect = connect
        self._schema = schema
        self._quoted = quoted_schema
        self._lock_key = _lock_key(schema)
        self._next_at: dict[str, float] = {}
        self._refused: set[str] = set()
        #: VACUUMs and ANALYZEs this daemon ran, by table name.
        self.runs: dict[str, int] = {}
        self.analyzed: dict[str, int] = {}

    async def run(self) -> None:
        """Vacuum and analyze what needs it (``BackendError`` if the statistics cannot
        be read)."""
        now = time.monotonic()
        due: list[tuple[str, str]] = []
        for table, dead, live, allowed, believed in await self._fetch(_DEAD_ROWS, self._schema):
            dead_enough = dead >= VACUUM_MIN_DEAD and dead > VACUUM_DEAD_FRACTION * (dead + live)
            if not allowed:
                if dead_enough:
                    self._refuse(table, dead)
                continue
            if dead_enough:
                due.append(("VACUUM (SKIP_LOCKED, TRUNCATE false)", table))
            elif live > 2 * max(believed, 0) + ANALYZE_MIN_GROWTH:
                due.append(("ANALYZE (SKIP_LOCKED)", table))
        due = [(verb, table) for verb, table in due if now >= self._next_at.get(table, 0.0)]
        if not due:
            return
        for _, table in due:
            self._next_at[table] = now + VACUUM_COOLDOWN_S
        try:
            await self._vacuum(due)
        except _ERRORS as exc:
            names = ", ".join(table for _, table in due)
            log.warning("could not VACUUM or ANALYZE %s (%s): will try again", names, exc)

    async def _vacuum(self, due: list[tuple[str, str]]) -> None:
        conn = await self._connect()
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._lock_key):
                return  # another daemon is at it
            for verb, table in due:
                await conn.execute(f"{verb} {self._quoted}.{table}", timeout=VACUUM_TIMEOUT_S)
                done = self.runs if verb.startswith("VACUUM") else self.analyzed
                done[table] = done.get(table, 0) + 1
                log.debug("%s %s.%s", verb.split()[0].lower(), self._schema, table)
        finally:
            # Closing ends the session, and the advisory lock with it, whatever happened.
            with contextlib.suppress(*_ERRORS):
                await conn.close(timeout=VACUUM_TIMEOUT_S)
            if not conn.is_closed():
                conn.terminate()

    def _refuse(self, table: str, dead: int) -> None:
        if table not in self._refused:
            self._refused.add(table)
            log.warning(
                "%s.%s has %d dead rows and this role may not VACUUM it (it is not the "
                "owner): left to autovacuum; takes slow down while it lags",
                self._schema,
                table,
                dead,
            )


def _lock_key(schema: str) -> int:
    """A per-schema advisory lock key, stable across processes."""
    value = 0
    for byte in f"channels-broker vacuum {schema}".encode():
        value = (value * 131 + byte) % (1 << 62)
    return value
