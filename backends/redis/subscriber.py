"""The wake-up (pub/sub) connection to one Redis server.

Theory of operation. A ``Subscriber`` holds the (S)SUBSCRIBE connection and the set of
channels the backend wants. It batches (un)subscriptions per loop pass, pings when
idle so a silent cut is noticed, resubscribes to all it wants after reconnecting (see
``link``) and reports every confirmed subscription (``on_subscribed``): the backend
then looks for messages that arrived while it was not yet (or no longer) listening
(see ``wakeups``). In Cluster mode subscriptions are sharded (SSUBSCRIBE), and an
unasked ``sunsubscribe`` (the slot moved) is reported as ``on_dropped``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from hiredis import pack_command
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from backends import BackendUnavailable

from .link import ConnectionFactory, Link

__all__ = ["Subscriber"]

log = logging.getLogger("channels_broker.backends.redis")


class Subscriber(Link):
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
