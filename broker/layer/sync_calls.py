"""``SyncLayer``: the blocking calls of one ``BrokerChannelLayer`` on a connection per
thread (``broker.layer.sync`` for plain sync code; ``short_loops`` for the loops
``async_to_sync`` makes). It knows the layer by what it uses of it (``Layer``), so the
layer's own module may hand calls to it without importing it back.
"""

from __future__ import annotations

import logging
import os
import threading
from asyncio import events
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from protocol import (
    MAX_ACK_PAIRS,
    Error,
    GroupAdd,
    GroupDiscard,
    GroupSend,
    Ok,
    Send,
    SendMany,
    max_request_frame_bytes,
    with_message_id,
)

from .blocking import BlockingConnection, Request
from .errors import BrokerUnavailable, exception_for
from .memberships import Memberships
from .outages import Outages
from .settings import LayerSettings
from .sync_session import SyncSession

__all__ = ["SEND_MANY_BATCH", "Layer", "SyncLayer"]

log = logging.getLogger("channels_broker.layer")

#: Messages per SEND_MANY frame: every daemon takes that many (its --max-batch is never lower).
SEND_MANY_BATCH = MAX_ACK_PAIRS
#: Room left in a SEND_MANY frame for its own fields and each item's msgpack headers.
_FRAME_SLACK_BYTES = 4096
_ITEM_OVERHEAD_BYTES = 16


class Layer(Protocol):
    """What the blocking calls use of a ``BrokerChannelLayer``."""

    settings: LayerSettings
    outages: Outages
    memberships: Memberships

    def require_valid_channel_name(self, name: str, receive: bool = False) -> bool: ...
    def require_valid_group_name(self, name: str) -> bool: ...
    def _serialize(self, message: dict[str, Any]) -> bytes: ...
    def _check_size(self, payload: bytes, limit: int) -> None: ...


class SyncLayer:
    """The blocking calls of one ``BrokerChannelLayer``; one connection per thread.

    ``broker.layer.sync.layer_for(layer)`` gives the one of ``layer`` (made by hand,
    outside Django's settings); that module's functions use that of
    ``CHANNEL_LAYERS[alias]``. With ``caller`` (``short_loops``), one connection for
    whoever holds it, which may be a thread running an event loop made for one call.
    """

    def __init__(self, layer: Layer, caller: object | None = None) -> None:
        self.layer = layer
        self._local: Any = threading.local() if caller is None else caller
        self._on_loop_allowed = caller is not None

    def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``channel``; ``ChannelFull`` if it is at capacity."""
        self.layer.require_valid_channel_name(channel)
        body = self.layer._serialize(message)
        conn = self._connection()
        payload = with_message_id(conn.sender, conn.next_seq(), body)
        self.layer._check_size(payload, conn.max_message_bytes)
        self._request(conn, Send(conn.next_id(), channel, payload))

    def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send to every member; members at capacity are skipped (never ``ChannelFull``)."""
        self.layer.require_valid_group_name(group)
        body = self.layer._serialize(message)
        conn = self._connection()
        payload = with_message_id(conn.sender, conn.next_seq(), body)
        self.layer._check_size(payload, conn.max_message_bytes)
        if conn.numbers_group_sends:
            self._numbered(conn, group, payload)
            return
        reply = self._request(conn, GroupSend(conn.next_id(), group, payload))
        if reply.count:
            log.info("group_send to %s skipped %d full members", group, reply.count)

    def _numbered(self, conn: BlockingConnection, group: str, payload: bytes) -> None:
        """A numbered group send: written, not waited for (``sync_session``). If the
        connection fails, the next one is opened now, and sends it again if it was
        numbered, or it goes on that one."""
        numbers = conn.session.numbers
        numbered_before = numbers.last_seq
        try:
            conn.group_send(group, payload)
        except BrokerUnavailable:
            self._local.conn = None
            self.layer.outages.saw_alive()  # a call failing next may meet a restart
            conn = self._connection()  # sends again what is unconfirmed, this one too
            if numbers.last_seq == numbered_before:  # it failed before it was written
                if conn.numbers_group_sends:
                    conn.group_send(group, payload)
                else:
                    self._request(conn, GroupSend(conn.next_id(), group, payload))

    def send_many(self, messages: Iterable[tuple[str, dict[str, Any]]]) -> list[int]:
        """Send each (channel, message), in order, a few hundred per round trip; return
        the indexes of those refused because their channel was full (the others were
        accepted). Every name and message is checked before anything is sent; if the
        connection fails on the way, the round trips before the failing one were accepted."""
        items = [(self._checked(channel), message) for channel, message in messages]
        bodies = [(channel, self.layer._serialize(message)) for channel, message in items]
        if not bodies:
            return []
        conn = self._connection()
        sender, next_seq = conn.sender, conn.next_seq
        payloads = [
            (channel, with_message_id(sender, next_seq(), body)) for channel, body in bodies
        ]
        for _, payload in payloads:
            self.layer._check_size(payload, conn.max_message_bytes)
        refused: list[int] = []
        for start, batch in _batches(payloads, max_request_frame_bytes(conn.max_message_bytes)):
            reply = self._request(conn, SendMany(conn.next_id(), tuple(batch)))
            refused += [start + index for index in reply.rejected]
        return refused

    def group_add(self, group: str, channel: str) -> None:
        """Add ``channel`` to ``group`` (renewing its membership for ``group_expiry``)."""
        self.layer.require_valid_group_name(group)
        self.layer.require_valid_channel_name(channel)
        conn = self._connection()
        self._request(conn, GroupAdd(conn.next_id(), group, channel))
        self.layer.memberships.added(group, channel)  # added again if the store is lost

    def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``; nothing if it was not a member."""
        self.layer.require_valid_group_name(group)
        self.layer.require_valid_channel_name(channel)
        self.layer.memberships.discarded(group, channel)
        conn = self._connection()
        self._request(conn, GroupDiscard(conn.next_id(), group, channel))

    def close(self) -> None:
        """Close this thread's connection, once its group sends are confirmed (within
        ``connect_timeout``); the next call opens another."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            if conn.is_usable():
                conn.settle(self.layer.settings.connect_timeout_s)
            conn.close()

    def _checked(self, channel: str) -> str:
        self.layer.require_valid_channel_name(channel)
        return channel

    def _connection(self) -> BlockingConnection:
        """This thread's connection: opened on first use, or again after the daemon
        closed it or this process was forked from the one that opened it."""
        if events._get_running_loop() is not None and not self._on_loop_allowed:
            raise RuntimeError(
                "broker.layer.sync blocks its thread, and this one runs an event loop:"
                " in async code, await the layer's own methods (get_channel_layer().send)"
            )
        local = self._local
        conn: BlockingConnection | None = getattr(local, "conn", None)
        if conn is not None and conn.is_usable():
            return conn
        local.conn = None
        if conn is not None:
            conn.close()
            if conn.pid == os.getpid():  # the daemon closed it: alive until now
                self.layer.outages.saw_alive()
        session: SyncSession | None = getattr(local, "session", None)
        if session is None or not session.is_ours():  # a forked child sends its own only
            session = local.session = SyncSession()
        settings, outages = self.layer.settings, self.layer.outages
        local.conn = conn = BlockingConnection.open(settings, outages, session)
        return conn

    def _request(self, conn: BlockingConnection, frame: Request) -> Ok:
        try:
            reply = conn.request(frame)
        except BaseException:
            self._local.conn = None  # the connection closed itself
            self.layer.outages.saw_alive()  # a call failing next may meet a restart
            raise
        if type(reply) is Error:
            raise exception_for(reply)
        assert type(reply) is Ok
        return reply


def _batches(
    payloads: Sequence[tuple[str, bytes]], max_frame_bytes: int
) -> Iterator[tuple[int, list[tuple[str, bytes]]]]:
    """(index of the first, items) of each SEND_MANY: at most ``SEND_MANY_BATCH`` items
    and a frame the daemon reads (one message under its limit always fits)."""
    room = max_frame_bytes - _FRAME_SLACK_BYTES
    start, size = 0, 0
    batch: list[tuple[str, bytes]] = []
    for index, (channel, payload) in enumerate(payloads):
        cost = len(channel) + len(payload) + _ITEM_OVERHEAD_BYTES
        if batch and (len(batch) >= SEND_MANY_BATCH or size + cost > room):
            yield start, batch
            start, batch, size = index, [], 0
        batch.append((channel, payload))
        size += cost
    if batch:
        yield start, batch
