"""The PostgreSQL backend's connections: a pool whose every call is bounded in time and
speaks our errors, and connections of their own.

Driver errors become ``BackendUnavailable`` (connection lost, database down or slower
than ``timeout``) or ``BackendError`` (a bug or misconfiguration: a missing schema, a
permission). A deadlock, which PostgreSQL resolves by rolling one side back, is
retried. The server process ids of our own connections are kept in ``own_pids``, so
that the listener can ignore the notifications this daemon sent itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from backends import BackendError, BackendUnavailable

from .url import PostgresOptions

__all__ = ["DRIVER_ERRORS", "UNAVAILABLE", "Database"]

#: A deadlock (PostgreSQL detects it and rolls back one side) is retried this often.
DEADLOCK_RETRIES = 3
#: Connections opened with the pool: sends, their notifications and acknowledgements
#: run side by side from the first message on, and opening a connection then would
#: cost that message tens of milliseconds.
WARM_CONNECTIONS = 3

#: Driver errors meaning "cannot reach the database now"; other PostgresErrors are bugs
#: or misconfiguration and stay ``BackendError``.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InternalClientError,  # a connection caught mid-way by a shutdown
)

#: Every error the driver raises for a statement that did not complete.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)

T = TypeVar("T")


class Database:
    """A pool of connections to one database, opened by ``open``."""

    def __init__(self, options: PostgresOptions, own_pids: set[int]) -> None:
        self.options = options
        self.own_pids = own_pids
        self._pool: Any = None

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        """Open the pool (``WARM_CONNECTIONS`` at first); ``BackendUnavailable`` if
        unreachable."""
        if self._pool is None:
            self._pool = await self.guard(
                asyncpg.create_pool(
                    self.options.dsn,
                    min_size=min(WARM_CONNECTIONS, self.options.pool_size),
                    max_size=self.options.pool_size,
                    timeout=self.options.timeout_s,
                    init=self._on_new_connection,
                    reset=_keep_session,
                    server_settings=dict(self.options.server_settings),
                )
            )

    async def close(self) -> None:
        """Close the pool, or drop its connections if the database does not answer."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.options.timeout_s)
            except DRIVER_ERRORS:
                pool.terminate()

    async def connect(self) -> Any:
        """A connection of its own, outside the pool: the listener's (LISTEN belongs to a
        session), the vacuum's (a session lock, and statements longer than ``timeout``)."""
        return await asyncio.wait_for(
            asyncpg.connect(
                self.options.dsn,
                timeout=self.options.timeout_s,
                server_settings=dict(self.options.server_settings),
            ),
            self.options.timeout_s,
        )

    async def run(self, operation: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``operation`` on a pooled connection, under the timeout, errors translated."""
        pool = self._pool
        if pool is None:
            raise BackendUnavailable("the PostgreSQL backend is not connected")
        timeout_s = self.options.timeout_s
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                async with asyncio.timeout(timeout_s):
                    conn = await pool.acquire()
                    try:
                        result = await operation(conn)
                    except BaseException:
                        await _give_back(pool, conn)
                        raise
                await _give_back(pool, conn)  # after the answer, which stands whatever happens
                return result
            except asyncpg.exceptions.DeadlockDetectedError as exc:
                if attempt == DEADLOCK_RETRIES:
                    raise BackendError(f"PostgreSQL: {exc}") from exc
            except TimeoutError as exc:
                raise BackendUnavailable(
                    f"PostgreSQL did not answer within {timeout_s:g} s"
                ) from exc
            except UNAVAILABLE as exc:
                raise BackendUnavailable(f"PostgreSQL unavailable: {_describe(exc)}") from exc
            except asyncpg.PostgresError as exc:
                raise BackendError(f"PostgreSQL: {_describe(exc)}") from exc
        raise AssertionError("unreachable")  # the loop returns or raises

    async def warm(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        """Run ``calls`` (statements that change nothing) on each of the pool's first
        connections at once: a PL/pgSQL function is compiled, and its statements
        planned, by the first call in each session (tens of milliseconds for the
        larger ones), which the first messages would otherwise wait for."""

        async def on_one(conn: Any) -> None:
            for sql, args in calls:
                await conn.fetch(sql, *args)

        pool = self._pool
        if pool is None:
            return
        held = [await pool.acquire() for _ in range(min(WARM_CONNECTIONS, pool.get_max_size()))]
        try:
            await self.guard(asyncio.gather(*(on_one(conn) for conn in held)))
        finally:
            for conn in held:
                await _give_back(pool, conn)

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await a connection step, translating driver errors as ``run`` does."""
        try:
            async with asyncio.timeout(self.options.timeout_s * 2):
                return await awaitable
        except TimeoutError as exc:
            raise BackendUnavailable(f"PostgreSQL did not answer at {self.where()}") from exc
        except UNAVAILABLE as exc:
            raise BackendUnavailable(
                f"cannot reach PostgreSQL at {self.where()}: {_describe(exc)}"
            ) from exc
        except asyncpg.PostgresError as exc:
            raise BackendError(f"PostgreSQL at {self.where()}: {_describe(exc)}") from exc

    def where(self) -> str:
        """host:port/database, for messages (never the password)."""
        parts = urlsplit(self.options.dsn)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"

    # -- one statement -----------------------------------------------------------

    async def fetch(self, sql: str, *args: Any) -> Any:
        return await self.run(lambda conn: conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await self.run(lambda conn: conn.fetchrow(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.run(lambda conn: conn.fetchval(sql, *args))

    async def execute(self, sql: str, *args: Any) -> None:
        await self.run(lambda conn: conn.execute(sql, *args))

    async def _on_new_connection(self, conn: Any) -> None:
        pid: int = conn.get_server_pid()
        self.own_pids.add(pid)
        conn.add_termination_listener(lambda _conn: self.own_pids.discard(pid))


async def _keep_session(conn: Any) -> None:
    """Skip asyncpg's reset query on release: one round trip per operation saved.

    Nothing here changes session state: locks are transaction-scoped, LISTEN is on the
    listener's own connection, settings come with the connection. asyncpg still rolls
    back a transaction left open before calling this.
    """


async def _give_back(pool: Any, conn: Any) -> None:
    """Return a connection to the pool; one that broke meanwhile is dropped, not raised.

    A server shutting down may cut the connection right after it answered: the
    answer (a committed send) must still reach the caller.
    """
    try:
        await pool.release(conn)
    except DRIVER_ERRORS:
        with contextlib.suppress(*UNAVAILABLE):  # the pool may have dropped it already
            conn.terminate()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
