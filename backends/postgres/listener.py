"""The PostgreSQL backend's wake-ups: one LISTEN connection per daemon, kept alive.

Theory of operation. Every committed send ends with ``pg_notify(<schema>, "<ns>
<channel>...")``; PostgreSQL delivers it to each listening connection after the commit,
so by the time a daemon hears of a message the message is there to take. A
``Listener`` holds one dedicated connection (not from the pool: a pooled connection
would stop listening when released), hands each notification's names to ``deliver``
and, when the connection drops, reconnects with a growing delay, listens again and
calls ``on_listening`` so the backend re-checks what it may have missed meanwhile.

Notifications sent by the daemon's own pool connections are dropped (``own_pids``):
the backend already woke its router right after the send returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .pool import DRIVER_ERRORS

__all__ = ["Listener"]

log = logging.getLogger("channels_broker.backends.postgres")

#: First and longest pause between reconnection attempts: quick after a blip, and
#: no storm of attempts against a database that is down for a while.
RECONNECT_DELAY_S = 0.1
RECONNECT_DELAY_MAX_S = 2.0

Connect = Callable[[], Awaitable[Any]]
Deliver = Callable[[str, str], None]


class Listener:
    """LISTENs on one notification channel, reconnecting until ``stop``."""

    def __init__(
        self,
        connect: Connect,
        channel: str,
        deliver: Deliver,
        on_listening: Callable[[], None],
        own_pids: set[int],
    ) -> None:
        self._connect = connect
        self._channel = channel
        self._deliver = deliver
        self._on_listening = on_listening
        self._own_pids = own_pids
        self._conn: Any = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        """Listen now (raising the driver's error if that fails), and keep listening."""
        await self._listen()
        self._task = asyncio.get_running_loop().create_task(self._keep_listening())

    async def stop(self) -> None:
        """Stop reconnecting and close the connection. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()

    async def _listen(self) -> None:
        conn = await self._connect()
        try:
            self._lost.clear()
            conn.add_termination_listener(self._on_terminated)
            await conn.add_listener(self._channel, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    async def _keep_listening(self) -> None:
        delay_s = RECONNECT_DELAY_S
        while True:
            await self._lost.wait()
            await self._close()
            log.warning("lost the LISTEN connection to PostgreSQL; reconnecting")
            while True:
                try:
                    await self._listen()
                    break
                except DRIVER_ERRORS as exc:
                    log.debug("reconnecting the LISTEN connection failed: %s", exc)
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, RECONNECT_DELAY_MAX_S)
            delay_s = RECONNECT_DELAY_S
            log.info("listening to PostgreSQL again")
            self._on_listening()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        conn.remove_termination_listener(self._on_terminated)
        try:
            await asyncio.wait_for(conn.close(), 1.0)
        except DRIVER_ERRORS:
            conn.terminate()

    def _on_terminated(self, conn: Any) -> None:
        self._lost.set()

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if pid in self._own_pids:
            return
        ns, _, names = payload.partition(" ")
        for name in names.split(" "):
            if name:
                self._deliver(ns, name)

    async def ping(self, timeout_s: float) -> None:
        """Check that the connection still answers; drop it (to reconnect) if it does not.

        A server that vanished without closing the socket is noticed only this way.
        """
        conn = self._conn
        if conn is None:
            return
        try:
            await conn.execute("SELECT 1", timeout=timeout_s)
        except DRIVER_ERRORS as exc:  # InternalClientError too: the task must live on
            log.debug("the LISTEN connection did not answer: %s", exc)
            conn.terminate()
            self._lost.set()
