"""``BrokerChannelLayer``: the Django Channels layer that talks to a channels-broker daemon.

Theory of operation. One instance serves a whole process, but sockets belong to
event loops, so the layer keeps one ``LoopClient`` (``broker.layer.client``) per
loop (the server's main loop, and the fresh loop ``async_to_sync`` makes for each
call from sync code),
created on first use and closed when its loop closes. Each loop client mints its
own client id, derived from a secret (``broker.layer.identity``), so ``new_channel()``
needs no round trip, and sends HELLO with both on every (re)connect, so the daemon
pushes messages for ``<prefix>.<client id>!...`` to it, including those that waited
during a reconnect, and to nobody else.

Receiving: pushed messages land in a per-channel local buffer and ``receive`` takes
them from there; the daemon counts them against the channel's capacity until an
ACK says they were consumed. Normal channels, and another loop's process-specific
channels, are pulled with RECEIVE. Cancellation never loses a message: a DELIVER
that arrives for a cancelled RECEIVE goes into the local buffer for the next
``receive`` of that channel.

Message ids: each loop client names itself with random bytes and numbers its sends,
and the payload carries both (``protocol.with_message_id``). A fault can hand a
message to a receiver again (a Redis primary that failed over before a take reached
its replica); ``HandedIds`` remembers the ids of the latest messages handed to
``receive`` on each channel, and a message with one of them is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import ssl
import types
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import msgpack
from channels.layers import BaseChannelLayer

from protocol import (
    Flush,
    GroupAdd,
    GroupDiscard,
    GroupSend,
    Ok,
    Ping,
    split_message_id,
    with_message_id,
)

from .client import LoopClient
from .connecting import RECONNECT_MAX_DELAY_S
from .encryption import UndecryptableMessage, check_not_encrypted, encryption_for
from .errors import BrokerUnavailable, LayerClosed, MessageTooLarge, too_large
from .identity import Family
from .memberships import MAX_REMEMBERED_MEMBERSHIPS, Memberships
from .outages import Outages
from .parking import IdlePool
from .settings import CONFIG_KEYS, LayerSettings
from .short_loops import SHORT_LOOPS, caller_calls
from .unserializable import unserializable
from .window import worth_resending

__all__ = [
    "BrokerChannelLayer",
    "BrokerUnavailable",
    "LayerClosed",
    "MessageTooLarge",
    "UndecryptableMessage",
]

log = logging.getLogger("channels_broker.layer")

RESERVED_KEY = "__asgi_channel__"
#: Messages whose ids are remembered after ``receive`` handed them: a redelivery comes
#: within seconds (a failover's, after a few thousand newer messages at most), and
#: each id kept costs about 200 bytes, so about 3 MB per process at most.
HANDED_IDS_KEPT = 16_384


class HandedIds:
    """The ids of the latest messages handed to ``receive``, per channel.

    Exact ids, not the newest per sender: a worker pulling a normal channel beside
    others may get one sender's messages out of order (a daemon that stops gives back
    what it took ahead, and another hands it out later), and those are new messages.
    """

    __slots__ = ("_ids", "redelivered")

    def __init__(self) -> None:
        self._ids: OrderedDict[tuple[str, bytes, int], None] = OrderedDict()
        #: Messages dropped because they had been handed before.
        self.redelivered = 0

    def is_new(self, channel: str, sender: bytes, seq: int) -> bool:
        """Note the id as handed and say True, or say False if it was handed before."""
        key, ids = (channel, sender, seq), self._ids
        if key in ids:
            self.redelivered += 1
            return False
        ids[key] = None
        if len(ids) > HANDED_IDS_KEPT:
            ids.popitem(last=False)
        return True


#: Channel names remembered as valid: a consumer sends to and receives from a few names
#: over and over, and Channels' check (a regex and two calls) ran twice per message.
VALID_NAMES_KEPT = 4096


class BrokerChannelLayer(BaseChannelLayer):  # type: ignore[misc]
    """A Channels layer backed by a channels-broker daemon (see ``CHANNEL_LAYERS``)."""

    extensions = ["groups", "flush"]

    #: Each event loop's client (a loop that goes away takes its entry with it).
    _clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopClient]
    #: The client ``_client`` gave out last.
    _last_client: LoopClient | None = None

    def __init__(
        self,
        hosts: Iterable[str] | None = None,
        token: str | None = None,
        prefix: str = "asgi",
        expiry: float = 60,
        group_expiry: float = 86400,
        capacity: int = 100,
        channel_capacity: dict[Any, int] | None = None,
        symmetric_encryption_keys: Iterable[str | bytes] | None = None,
        max_message_bytes: int | None = None,
        connect_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        remembered_memberships: int = MAX_REMEMBERED_MEMBERSHIPS,
        **other: Any,
    ) -> None:
        """Raises ``LayerConfigError`` for each CONFIG key or value it cannot use, saying what
        to write instead (docs/migrating.md), before any I/O."""
        # The parameters as CONFIG gave them; ``other`` holds the keys the layer does not take.
        given = {name: value for name, value in locals().items() if name in CONFIG_KEYS}
        #: Checked whole, then handed to every loop's client: they never read the layer back.
        self.settings = LayerSettings.from_config({**given, **other})
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity)
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.prefix = prefix
        self.group_expiry = group_expiry
        #: None without keys: then no code of broker.layer.encryption runs for a message.
        self._encryption = encryption_for(symmetric_encryption_keys, self.expiry)
        self._clients = weakref.WeakKeyDictionary()  # typed in the class body
        self._valid_names: set[str] = set()
        self.idle_pool = IdlePool()
        self.family = Family()  # of every loop's client id: each may pull another's channels
        self.handed = HandedIds()
        self.outages = Outages(connect_timeout, RECONNECT_MAX_DELAY_S)  # shared by the loops
        #: Every membership this layer made, re-added if the daemon loses its store.
        self.memberships = Memberships(
            self.settings.group_expiry_s, self.settings.remembered_memberships
        )
        # Parked sockets belong to no loop; close them when the layer goes away.
        weakref.finalize(self, self.idle_pool.close_all)

    # -- the Channels layer API --------------------------------------------

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``channel``; raise ``ChannelFull`` if it is at capacity."""
        self.require_valid_channel_name(channel)
        if asyncio.get_running_loop() in SHORT_LOOPS and (caller := caller_calls(self)):
            with caller as calls:  # async_to_sync from sync code: no loop connection
                return calls.send(channel, message)
        client = self._client()
        payload = with_message_id(client.sender, client.next_seq(), self._serialize(message))
        limit = client.max_message_bytes if client.conn else await client.message_limit()
        self._check_size(payload, limit)
        await client.window.send(channel, payload)

    async def receive(self, channel: str) -> dict[str, Any]:
        """Wait for and return the next message on ``channel``. Safe to cancel.

        Raises ``UndecryptableMessage`` for a message this layer's keys cannot open
        (that message is consumed; the next call returns the next one).
        """
        if type(channel) is not str or channel not in self._valid_names:
            self.require_valid_channel_name(channel)
        client = self._client()
        inbox = client.inbox
        while True:
            # A message buffered already is taken here, without a coroutine more.
            payload = inbox.take(channel)
            if payload is None:
                payload = await client.receive(channel)
            sender, seq, payload = split_message_id(payload)
            if not sender or self.handed.is_new(channel, sender, seq):
                break
            log.info("dropped a message %s handed to receive() before (a redelivery)", channel)
        if self._encryption is not None:
            payload = self._encryption.decrypt(payload, channel)
        try:
            message: dict[str, Any] = msgpack.unpackb(payload, raw=False)
        except ValueError:
            check_not_encrypted(payload, channel)  # say so, if that is why
            raise
        return message

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name owned by this event loop's connection."""
        client = self._client()
        client.minted = True
        return f"{prefix}.{client.client_id}!{secrets.token_hex(6)}"

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        client = self._client()
        await client.request(GroupAdd(client.next_id(), group, channel))
        self.memberships.added(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        client = self._client()
        self.memberships.discarded(group, channel)
        await client.request(GroupDiscard(client.next_id(), group, channel))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send to every member; members at capacity are skipped (never ``ChannelFull``).

        To a daemon that numbers group sends, it returns once the frame is written; past
        a bound of unconfirmed ones, it waits for a CONFIRM first (docs/flow.md). To
        another, once the daemon answers.
        """
        self.require_valid_group_name(group)
        if asyncio.get_running_loop() in SHORT_LOOPS and (caller := caller_calls(self)):
            with caller as calls:  # async_to_sync from sync code: no loop connection
                return calls.group_send(group, message)
        client = self._client()
        payload = with_message_id(client.sender, client.next_seq(), self._serialize(message))
        limit = client.max_message_bytes if client.conn else await client.message_limit()
        self._check_size(payload, limit)
        if client.conn is not None and client.window.numbers_groups:
            unconfirmed = client.unconfirmed
            while unconfirmed.is_full(len(payload)):  # the bound: until a CONFIRM
                await unconfirmed.room(client.loop)
            if client.group_send_numbered(group, payload):
                return  # written, numbered: confirmed later (``acks.Unconfirmed``)
        try:
            reply = await client.request(GroupSend(client.next_id(), group, payload))
        except BrokerUnavailable as exc:  # it may have been stored: again, same id
            if not worth_resending(exc):
                raise
            again = functools.partial(GroupSend, group=group, payload=payload)
            reply = await client.window.resend_until_answered(again)
        if type(reply) is Ok and reply.count:
            log.info("group_send to %s skipped %d full members", group, reply.count)

    async def flush(self) -> None:
        """Empty every channel and group of this layer's prefix, for every client."""
        client = self._client()
        await client.request(Flush(client.next_id()))

    async def close(self) -> None:
        """Close this event loop's connection and idle ones; waiting calls raise ``LayerClosed``."""
        self.idle_pool.close_all()
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def ping(self) -> float:
        """Round trip to the daemon in seconds."""
        client = self._client()
        started = asyncio.get_running_loop().time()
        await client.request(Ping(client.next_id()))
        return asyncio.get_running_loop().time() - started

    # -- internals -----------------------------------------------------------

    def require_valid_channel_name(self, name: str, receive: bool = False) -> bool:
        """Channels' check of a channel name (``TypeError``), remembered for valid names."""
        if type(name) is str and name in self._valid_names and not receive:
            return True
        super().require_valid_channel_name(name, receive)
        if len(self._valid_names) >= VALID_NAMES_KEPT:
            self._valid_names.clear()
        self._valid_names.add(name)
        return True

    def _client(self) -> LoopClient:
        loop = asyncio.get_running_loop()
        # The last loop's client, without a weak-keyed lookup: the loop calls again and
        # again (a closed client is not used again: its loop is closing).
        client = self._last_client
        if client is not None and client.loop is loop and not client.closed:
            return client
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = LoopClient(
                self.settings, loop, self.idle_pool, self.family, self.outages, self.memberships
            )
            _close_with_loop(loop, self._clients)
        self._last_client = client
        return client

    def _serialize(self, message: dict[str, Any]) -> bytes:
        """The message as msgpack bytes, encrypted if the layer has keys (the body its
        id goes in front of); refuses what Channels forbids, before any I/O."""
        if not isinstance(message, dict):
            raise TypeError(f"message must be a dict, not {type(message).__name__}")
        if RESERVED_KEY in message:
            raise ValueError(f"message must not contain the reserved key {RESERVED_KEY!r}")
        try:
            payload: bytes = msgpack.packb(message, use_bin_type=True)
        except (TypeError, OverflowError) as exc:  # a value msgpack cannot pack
            raise unserializable(message, exc) from exc
        if self._encryption is not None:
            payload = self._encryption.encrypt(payload)
        return payload

    def _check_size(self, payload: bytes, limit: int) -> None:
        own_limit = self.settings.max_message_bytes
        if len(payload) > limit or (own_limit is not None and len(payload) > own_limit):
            raise too_large(len(payload), limit, own_limit)


def _close_with_loop(
    loop: asyncio.AbstractEventLoop,
    clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopClient],
) -> None:
    """Close the loop's client just before the loop closes (``async_to_sync`` loops).

    The loop is stopped but not closed when ``close`` is called, so it can still run
    the client's shutdown; without this the socket would leak and warn.
    """
    original = loop.close

    def close(self: asyncio.AbstractEventLoop) -> None:
        client = clients.pop(self, None)
        if client is not None and not self.is_running():
            self.run_until_complete(client.close(park=True))
        self.close = original  # type: ignore[method-assign]
        original()

    # A loop type that refuses attributes relies on the layer's close() instead.
    with contextlib.suppress(AttributeError):
        loop.close = types.MethodType(close, loop)  # type: ignore[method-assign]
