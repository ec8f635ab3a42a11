"""Redis connections of the backend: auto-pipelined commands, and a wake-up subscriber.

Theory of operation. A ``Pipe`` is one redis-py connection shared by every caller:
commands issued during one event-loop pass are written together and their replies
read back in order by one reader task (Redis answers in order on a connection). So
a burst of N operations costs one write and about one read, not N round trips, and
the order in which callers issue commands is the order Redis runs them. That order is
also why ``RedisBackend.release`` need not wait: a later command of this daemon on
the same connection sees its effect.

A Pipe never retries a command that may have reached Redis (at-most-once); when the
connection fails, every pending call fails with ``BackendUnavailable`` and a
background task reconnects with backoff, then reports ``on_up``. While down, calls
fail at once rather than queue up. Deadlines are ours, not socket timeouts: redis-py
8's 5 s default socket timeout is what broke blocking reads in channels_redis
(#422), so sockets here have none and each call has ``timeout_s``.

A ``Subscriber`` holds the (S)SUBSCRIBE connection. It batches (un)subscriptions per
loop pass, pings when idle so a silent cut is noticed, resubscribes after reconnecting
and reports every confirmed subscription (``on_subscribed``): the backend then looks
for messages that arrived while it was not yet (or no longer) listening.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from hiredis import pack_command
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from backends import BackendUnavailable

__all__ = ["ConnectionFactory", "Pipe", "Subscriber"]

log = logging.getLogger("channels_broker.backends.redis")

#: Makes a fresh, unconnected connection (its address may change: Sentinel failover).
ConnectionFactory = Callable[[], Awaitable[AbstractConnection]]
#: Runs on a new connection before callers use it (load scripts, check the role).
SetupHook = Callable[[AbstractConnection], Awaitable[None]]

#: Reconnect backoff: quick first retries for a restart, capped so an outage costs
#: little; every failed attempt is bounded by the connect timeout.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0


#: Disconnects under way (see ``_Link.fail``).
_closing: set[asyncio.Task[None]] = set()


async def _noop_setup(conn: AbstractConnection) -> None:
    """No setup needed."""


class _Link:
    """Connect-and-recover logic shared by ``Pipe`` and ``Subscriber``."""

    def __init__(
        self,
        name: str,
        factory: ConnectionFactory,
        *,
        timeout_s: float,
        setup: SetupHook = _noop_setup,
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


class Pipe(_Link):
    """One auto-pipelined command connection; ``call`` costs no round trip of its own."""

    def __init__(
        self,
        name: str,
        factory: ConnectionFactory,
        *,
        timeout_s: float,
        setup: SetupHook = _noop_setup,
        on_up: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name, factory, timeout_s=timeout_s, setup=setup, on_up=on_up)
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._outbox: list[bytes] = []
        self._flushing = False
        self._watchdog: asyncio.TimerHandle | None = None

    def call(self, *args: str | bytes | int | float) -> asyncio.Future[Any]:
        """Queue a command; the future gets its reply, or ``ResponseError`` /
        ``BackendUnavailable``. Raises ``BackendUnavailable`` at once while down."""
        conn = self.conn
        if conn is None:
            raise BackendUnavailable(f"Redis {self.name} unavailable: {self.last_error}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._outbox.append(pack_command(args))  # type: ignore[arg-type]  # stub says 1-tuple
        self._pending.append((future, loop.time()))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush)
        return future

    async def execute(self, *args: str | bytes | int | float) -> Any:
        """``call`` and wait for the reply."""
        return await self.call(*args)

    def _flush(self) -> None:
        self._flushing = False
        conn = self.conn
        if conn is None or not self._outbox:
            return
        data, self._outbox = self._outbox, []
        writer = conn._writer  # redis-py's stream; writing directly avoids a task per batch
        try:
            assert writer is not None
            writer.writelines(data)
        except (OSError, RuntimeError, AssertionError) as exc:
            self.fail(conn, exc)
            return
        if self._watchdog is None:
            self._arm_watchdog(self.timeout_s)

    def _arm_watchdog(self, delay_s: float) -> None:
        self._watchdog = asyncio.get_running_loop().call_later(delay_s, self._check_deadline)

    def _check_deadline(self) -> None:
        """Fail the connection if its oldest pending call is past the deadline."""
        self._watchdog = None
        if not self._pending or self.conn is None:
            return
        overdue_s = asyncio.get_running_loop().time() - self._pending[0][1]
        if overdue_s >= self.timeout_s:
            self.fail(self.conn, TimeoutError(f"no reply within {self.timeout_s} s"))
        else:
            self._arm_watchdog(self.timeout_s - overdue_s)

    async def _read(self, conn: AbstractConnection) -> None:
        pending = self._pending
        while True:
            try:
                reply = await conn.read_response(
                    disable_decoding=True, timeout=math.inf, disconnect_on_error=False
                )
            except ResponseError as exc:
                reply = exc
            except (RedisError, OSError, asyncio.IncompleteReadError) as exc:
                self.fail(conn, exc)
                return
            if not pending:  # a reply nobody asked for: the stream is out of step
                self.fail(conn, RedisError("unexpected reply"))
                return
            future, _ = pending.popleft()
            if future.done():
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _lost(self, error: BackendUnavailable) -> None:
        pending, self._pending = self._pending, deque()
        self._outbox = []
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for future, _ in pending:
            if not future.done():
                future.set_exception(error)
                future.exception()  # a fire-and-forget call must not warn when collected


class Subscriber(_Link):
    """The pub/sub connection: wanted channels, kept subscribed across reconnects."""

    def __init__(
        self,
        name: str,
        factory: ConnectionFactory,
        *,
        timeout_s: float,
        health_check_s: float,
        sharded: bool,
        on_message: Callable[[bytes, bytes], None],
        on_subscribed: Callable[[bytes], None],
        on_dropped: Callable[[bytes], None] | None = None,
    ) -> None:
        super().__init__(name, factory, timeout_s=timeout_s)
        self._health_check_s = health_check_s
        self._prefix = "S" if sharded else ""
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._on_dropped = on_dropped
        self.wanted: set[bytes] = set()
        #: Subscriptions Redis confirmed on the current connection (not yet dropped).
        self.active: set[bytes] = set()
        self._to_add: set[bytes] = set()
        self._to_remove: set[bytes] = set()
        self._scheduled = False
        self._last_read = 0.0
        self._pinged_at: float | None = None
        self._health: asyncio.TimerHandle | None = None

    def subscribe(self, channels: Iterable[bytes]) -> None:
        for channel in channels:
            if channel not in self.wanted:
                self.wanted.add(channel)
                self._to_remove.discard(channel)
                self._to_add.add(channel)
        self._schedule()

    def unsubscribe(self, channels: Iterable[bytes]) -> None:
        for channel in channels:
            if channel in self.wanted:
                self.wanted.discard(channel)
                self.active.discard(channel)
                self._to_add.discard(channel)
                self._to_remove.add(channel)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and (self._to_add or self._to_remove):
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_changes)

    def _send_changes(self) -> None:
        self._scheduled = False
        conn = self.conn
        if conn is None:
            return  # all of ``wanted`` is subscribed again on reconnect
        commands: list[tuple[str, ...]] = []
        # One SSUBSCRIBE names channels of one slot only: send them one by one.
        batch = 1 if self._prefix else 512
        for verb, channels in (("SUBSCRIBE", self._to_add), ("UNSUBSCRIBE", self._to_remove)):
            names = sorted(channels)
            for start in range(0, len(names), batch):
                chunk = names[start : start + batch]
                commands.append((self._prefix + verb, *(n.decode() for n in chunk)))
            channels.clear()
        self._write(conn, commands)

    def _write(self, conn: AbstractConnection, commands: list[tuple[str, ...]]) -> None:
        if not commands:
            return
        try:
            assert conn._writer is not None
            conn._writer.writelines([pack_command(c) for c in commands])  # type: ignore[arg-type]
        except (OSError, RuntimeError, AssertionError) as exc:
            self.fail(conn, exc)

    def _connected(self, conn: AbstractConnection) -> None:
        self._to_add = set(self.wanted)
        self._to_remove.clear()
        self._last_read = asyncio.get_running_loop().time()
        self._pinged_at = None
        self._send_changes()
        self._arm_health()

    def _lost(self, error: BackendUnavailable) -> None:
        self.active.clear()
        if self._health is not None:
            self._health.cancel()
            self._health = None

    def _arm_health(self) -> None:
        self._health = asyncio.get_running_loop().call_later(
            min(self._health_check_s, self.timeout_s), self._check_health
        )

    def _check_health(self) -> None:
        """Ping after ``health_check_s`` of silence; no answer in ``timeout_s``: reconnect."""
        conn = self.conn
        if conn is None:
            return
        now = asyncio.get_running_loop().time()
        if self._pinged_at is not None and now - self._pinged_at >= self.timeout_s:
            self.fail(conn, TimeoutError(f"no answer to PING within {self.timeout_s} s"))
            return
        if self._pinged_at is None and now - self._last_read >= self._health_check_s:
            self._pinged_at = now
            self._write(conn, [("PING",)])
        self._arm_health()

    async def _read(self, conn: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                reply = await conn.read_response(
                    disable_decoding=True, timeout=math.inf, disconnect_on_error=False
                )
            except ResponseError as exc:  # a refused (un)subscribe: the connection is fine
                log.warning("Redis %s refused a subscription change: %s", self.name, exc)
                continue
            except (RedisError, OSError, asyncio.IncompleteReadError) as exc:
                self.fail(conn, exc)
                return
            self._last_read = loop.time()
            self._pinged_at = None
            if isinstance(reply, list) and len(reply) >= 2:
                self._dispatch(reply)

    def _dispatch(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind in (b"message", b"smessage") and len(reply) == 3:
            self._on_message(reply[1], reply[2])
        elif kind in (b"subscribe", b"ssubscribe"):
            if reply[1] in self.wanted:
                self.active.add(reply[1])
                self._on_subscribed(reply[1])
        elif kind == b"sunsubscribe" and reply[1] in self.wanted and self._on_dropped:
            # Not asked for: Redis Cluster moved the channel's slot to another node.
            self.active.discard(reply[1])
            self._on_dropped(reply[1])
