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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import types
import weakref
from collections.abc import Iterable
from typing import Any

import msgpack
from channels.layers import BaseChannelLayer

from protocol import Flush, GroupAdd, GroupDiscard, GroupSend, Ok, Ping

from .client import LoopClient
from .encryption import UndecryptableMessage, check_not_encrypted, encryption_for
from .errors import BrokerUnavailable, LayerClosed, MessageTooLarge
from .identity import Family
from .parking import IdlePool
from .settings import DEFAULT_HOSTS, LayerSettings, capacity_patterns, parse_host

__all__ = [
    "BrokerChannelLayer",
    "BrokerUnavailable",
    "LayerClosed",
    "MessageTooLarge",
    "UndecryptableMessage",
]

log = logging.getLogger("channels_broker.layer")

RESERVED_KEY = "__asgi_channel__"
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
    ) -> None:
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity)
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.prefix = prefix
        self.group_expiry = group_expiry
        #: None without keys: then no code of broker.layer.encryption runs for a message.
        self._encryption = encryption_for(symmetric_encryption_keys, self.expiry)
        #: Handed to every event loop's client: they never read the layer back.
        self.settings = LayerSettings(
            hosts=tuple(parse_host(host) for host in (hosts or DEFAULT_HOSTS)),
            token=token or "",
            prefix=prefix,
            capacity=int(self.capacity),
            expiry_s=float(self.expiry),
            group_expiry_s=float(group_expiry),
            channel_capacity=capacity_patterns(channel_capacity or {}),
            max_message_bytes=max_message_bytes,
            connect_timeout_s=connect_timeout,
            ssl_context=ssl_context,
        )
        self._clients = weakref.WeakKeyDictionary()
        self._valid_names: set[str] = set()
        self.idle_pool = IdlePool()
        self.family = Family()  # of every loop's client id: each may pull another's channels
        # Parked sockets belong to no loop; close them when the layer goes away.
        weakref.finalize(self, self.idle_pool.close_all)

    # -- the Channels layer API --------------------------------------------

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``channel``; raise ``ChannelFull`` if it is at capacity."""
        self.require_valid_channel_name(channel)
        payload = self._serialize(message)
        client = self._client()
        limit = client.max_message_bytes if client.conn else await client.message_limit()
        self._check_size(payload, limit)
        await client.window.send(channel, payload)

    async def receive(self, channel: str) -> dict[str, Any]:
        """Wait for and return the next message on ``channel``. Safe to cancel.

        Raises ``UndecryptableMessage`` for a message this layer's keys cannot open
        (that message is consumed; the next call returns the next one).
        """
        self.require_valid_channel_name(channel)
        client = self._client()
        payload = await client.receive(channel)
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
        if client.owns(channel):
            client.memberships[(group, channel)] = client.loop.time()

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        client = self._client()
        client.memberships.pop((group, channel), None)
        await client.request(GroupDiscard(client.next_id(), group, channel))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send to every member; members at capacity are skipped (never ``ChannelFull``)."""
        self.require_valid_group_name(group)
        payload = self._serialize(message)
        client = self._client()
        limit = client.max_message_bytes if client.conn else await client.message_limit()
        self._check_size(payload, limit)
        reply = await client.request(GroupSend(client.next_id(), group, payload))
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
                self.settings, loop, self.idle_pool, self.family
            )
            _close_with_loop(loop, self._clients)
        self._last_client = client
        return client

    def _serialize(self, message: dict[str, Any]) -> bytes:
        """The message as msgpack bytes, encrypted if the layer has keys; refuses what
        Channels forbids, before any I/O."""
        if not isinstance(message, dict):
            raise TypeError(f"message must be a dict, not {type(message).__name__}")
        if RESERVED_KEY in message:
            raise ValueError(f"message must not contain the reserved key {RESERVED_KEY!r}")
        payload: bytes = msgpack.packb(message, use_bin_type=True)
        if self._encryption is not None:
            payload = self._encryption.encrypt(payload)
        return payload

    def _check_size(self, payload: bytes, limit: int) -> None:
        if self.settings.max_message_bytes is not None:
            limit = min(limit, self.settings.max_message_bytes)
        if len(payload) > limit:
            raise MessageTooLarge(f"message of {len(payload)} bytes is over the limit of {limit}")


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
