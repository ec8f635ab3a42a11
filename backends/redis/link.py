"""One Redis connection that reconnects by itself: what ``Pipe`` and ``Subscriber`` share.

Theory of operation. A ``Link`` holds at most one redis-py connection. ``open``
connects now (and raises ``BackendUnavailable``); ``start`` connects in the
background. Each new connection first runs a setup hook (load the scripts, check that
a Sentinel-named server is the master), then the subclass's reader task takes over.
When anything fails (a read, a write, a deadline), ``fail`` drops the connection:
whatever waits on it fails with ``BackendUnavailable`` (the subclass's ``_lost``), and
a background task reconnects with backoff, then reports ``on_up`` so the backend can
look again at what it may have missed. Nothing is retried: a command that may have
reached Redis is never sent twice (at-most-once).

Deadlines are ours, not socket timeouts: redis-py 8's 5 s default socket timeout is
what broke blocking reads in channels_redis (#422), so sockets here have none and
each connect is bounded by ``timeout_s`` plus the connect timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from backends import BackendUnavailable

__all__ = ["ConnectionFactory", "Link", "SetupHook", "noop_setup"]

log = logging.getLogger("channels_broker.backends.redis")

#: Makes a fresh, unconnected connection (its address may change: Sentinel failover).
ConnectionFactory = Callable[[], Awaitable[AbstractConnection]]
#: Runs on a new connection before callers use it (load scripts, check the role).
SetupHook = Callable[[AbstractConnection], Awaitable[None]]

#: Reconnect backoff: quick first retries for a restart, capped so an outage costs
#: little; every failed attempt is bounded by the connect timeout.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0


#: Disconnects under way (see ``Link.fail``).
_closing: set[asyncio.Task[None]] = set()


async def noop_setup(conn: AbstractConnection) -> None:
    """No setup needed."""


class Link:
    """Connect-and-recover logic shared by ``Pipe`` and ``Subscriber``."""

    def __init__(
        self,
        name: str,
        factory: ConnectionFactory,
        *,
        timeout_s: float,
        setup: SetupHook = noop_setup,
        on_up: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._factory = factory
        self._setup = setup
        self._on_up = on_up
        self.timeout_s = timeout_s
        self.conn: AbstractConnection | None = None
        self.last_error = "not connected"
        self._closed = False
        self.ever_up = False
        self._reader: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None

    @property
    def is_up(self) -> bool:
        return self.conn is not None

    def start(self) -> None:
        """Connect in the background (with backoff) unless up or already trying."""
        self._closed = False
        if self.conn is None and self._reconnecting is None:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def open(self) -> None:
        """Connect now; raise ``BackendUnavailable`` if that fails."""
        self._closed = False
        if self.conn is None:
            await self._connect()

    async def close(self) -> None:
        self._closed = True
        for task in (self._reconnecting, self._reader):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._reconnecting = self._reader = None
        conn, self.conn = self.conn, None
        self._lost(BackendUnavailable("the Redis backend was closed"))
        if conn is not None:
            await conn.disconnect(nowait=True)

    async def _connect(self) -> None:
        conn = await self._factory()
        try:
            async with asyncio.timeout(self.timeout_s + (conn.socket_connect_timeout or 0)):
                await conn.connect()  # type: ignore[no-untyped-call]
                await self._setup(conn)
        except (RedisError, OSError, TimeoutError) as exc:
            await conn.disconnect(nowait=True)
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise BackendUnavailable(f"Redis {self.name}: {self.last_error}") from exc
        self.conn = conn
        self.ever_up = True
        self._reader = asyncio.get_running_loop().create_task(self._read(conn))
        self._connected(conn)

    def fail(self, conn: AbstractConnection, exc: BaseException) -> None:
        """Give up on ``conn`` (if still current): fail what waits, reconnect in the background."""
        if self.conn is not conn:
            return
        self.conn = None
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("Redis %s connection lost (%s); reconnecting", self.name, self.last_error)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._lost(BackendUnavailable(f"Redis {self.name} connection lost: {self.last_error}"))
        loop = asyncio.get_running_loop()
        closing = loop.create_task(conn.disconnect(nowait=True))
        _closing.add(closing)  # a task nobody holds may be collected before it ran
        closing.add_done_callback(_closing.discard)
        if not self._closed and self._reconnecting is None:
            self._reconnecting = loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = BACKOFF_FIRST_S
        try:
            while not self._closed:
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                except BackendUnavailable:
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                log.warning("Redis %s connection restored", self.name)
                if self._on_up is not None:
                    self._on_up()
                return
        finally:
            self._reconnecting = None

    async def _read(self, conn: AbstractConnection) -> None:
        raise NotImplementedError

    def _connected(self, conn: AbstractConnection) -> None:
        """A new connection is in place."""

    def _lost(self, error: BackendUnavailable) -> None:
        """The connection is gone: fail whatever waits on it."""
