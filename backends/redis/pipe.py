"""The command connection to one Redis server, auto-pipelined and shared by every caller.

Theory of operation. A ``Pipe`` is one redis-py connection shared by every caller:
commands issued during one event-loop pass are written together and their replies
read back in order by one reader task (Redis answers in order on a connection). So
a burst of N operations costs one write and about one read, not N round trips, and
the order in which callers issue commands is the order Redis runs them. That order is
also why a release need not wait (see ``commands``): a later command of this daemon
on the same connection sees its effect.

A Pipe never retries a command that may have reached Redis (at-most-once); when the
connection fails, every pending call fails with ``BackendUnavailable`` and the pipe
reconnects in the background with backoff (a ``Link``, see ``link``). While down, calls fail at once
rather than queue up. Each call has ``timeout_s``: a watchdog fails the connection
when its oldest pending call is older than that (sockets have no read timeout).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from hiredis import pack_command
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from backends import BackendUnavailable

from .link import ConnectionFactory, Link, SetupHook, noop_setup

__all__ = ["Pipe"]


class Pipe(Link):
    """One auto-pipelined command connection; ``call`` costs no round trip of its own."""

    def __init__(
        self,
        name: str,
        factory: ConnectionFactory,
        *,
        timeout_s: float,
        setup: SetupHook = noop_setup,
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
