"""``BrokerChannelLayer``: the Django Channels layer that talks to a channels-broker daemon.

Theory of operation. One instance serves a whole process, but sockets belong to
event loops, so the layer keeps one ``LoopClient`` (``broker.layer.client``) per
loop (the server's main loop, and the fresh loop ``async_to_sync`` makes for each
call from sync code),
created on first use and closed when its loop closes. Each loop client mints its
own client id, so ``new_channel()`` needs no round trip, and sends HELLO with it on
every (re)connect, so the daemon pushes messages for ``<prefix>.<client id>!...``
to it, including those that waited during a reconnect.

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
from urllib.parse import urlsplit

import msgpack
from channels.layers import BaseChannelLayer

from protocol import (
    PROTOCOL_VERSION,
    Flush,
    GroupAdd,
    GroupDiscard,
    GroupSend,
    Hello,
    Ok,
    Ping,
    Send,
)

from .client import (
    BrokerUnavailable,
    LayerClosed,
    LoopClient,
    MessageTooLarge,
    raise_for,
)
from .parking import IdlePool

__all__ = [
    "BrokerChannelLayer",
    "BrokerUnavailable",
    "LayerClosed",
    "MessageTooLarge",
]

log = logging.getLogger("channels_broker.layer")

DEFAULT_HOSTS = ("tcp://127.0.0.1:7733",)
#: What the daemon accepts by default; the daemon's WELCOME gives the real figure.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Largest frame we read: the message limit plus a group send's member list.
MAX_FRAME_BYTES = 80 * 1024 * 1024
#: Reconnect backoff: first delay, cap, in seconds; each attempt is jittered.
RECONNECT_FIRST_DELAY_S = 0.05
RECONNECT_MAX_DELAY_S = 2.0
RESERVED_KEY = "__asgi_channel__"


class BrokerChannelLayer(BaseChannelLayer):  # type: ignore[misc]
    """A Channels layer backed by a channels-broker daemon (see ``CHANNEL_LAYERS``)."""

    extensions = ["groups", "flush"]

    def __init__(
        self,
        hosts: Iterable[str] | None = None,
        token: str | None = None,
        prefix: str = "asgi",
        expiry: float = 60,
        group_expiry: float = 86400,
        capacity: int = 100,
        channel_capacity: dict[Any, int] | None = None,
        max_message_bytes: int | None = None,
        connect_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity)
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.hosts = [_parse_host(host) for host in (hosts or DEFAULT_HOSTS)]
        self.token = token or ""
        self.prefix = prefix
        self.group_expiry = group_expiry
        self.max_message_bytes = max_message_bytes
        self.connect_timeout = connect_timeout
        #: For tls:// hosts; the default verifies the daemon against the system's CAs.
        self.ssl_context = ssl_context
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        self.idle_pool = IdlePool()
        # Parked sockets belong to no loop; close them when the layer goes away.
        weakref.finalize(self, self.idle_pool.close_all)

    # -- the Channels layer API --------------------------------------------

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``channel``; raise ``ChannelFull`` if it is at capacity."""
        self.require_valid_channel_name(channel)
        payload = self._serialize(message)
        client = self._client()
        self._check_size(payload, await client.message_limit())
        reply = await client.request(Send(client.next_id(), channel, payload))
        raise_for(reply)

    async def receive(self, channel: str) -> dict[str, Any]:
        """Wait for and return the next message on ``channel``. Safe to cancel."""
        self.require_valid_channel_name(channel)
        client = self._client()
        payload = await client.receive(channel)
        message: dict[str, Any] = msgpack.unpackb(payload, raw=False)
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
        raise_for(await client.request(GroupAdd(client.next_id(), group, channel)))
        if client.owns(channel):
            client.memberships[(group, channel)] = client.loop.time()

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        client = self._client()
        client.memberships.pop((group, channel), None)
        raise_for(await client.request(GroupDiscard(client.next_id(), group, channel)))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send to every member; members at capacity are skipped (never ``ChannelFull``)."""
        self.require_valid_group_name(group)
        payload = self._serialize(message)
        client = self._client()
        self._check_size(payload, await client.message_limit())
        reply = await client.request(GroupSend(client.next_id(), group, payload))
        raise_for(reply)
        if isinstance(reply, Ok) and reply.count:
            log.info("group_send to %s skipped %d full members", group, reply.count)

    async def flush(self) -> None:
        """Empty every channel and group of this layer's prefix, for every client."""
        client = self._client()
        raise_for(await client.request(Flush(client.next_id())))

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
        raise_for(await client.request(Ping(client.next_id())))
        return asyncio.get_running_loop().time() - started

    # -- internals -----------------------------------------------------------

    def _client(self) -> LoopClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = LoopClient(self, loop, self.idle_pool.take())
            _close_with_loop(loop, self._clients)
        return client

    def _serialize(self, message: dict[str, Any]) -> bytes:
        """The message as msgpack bytes; refuses what Channels forbids, before any I/O."""
        if not isinstance(message, dict):
            raise TypeError(f"message must be a dict, not {type(message).__name__}")
        if RESERVED_KEY in message:
            raise ValueError(f"message must not contain the reserved key {RESERVED_KEY!r}")
        payload: bytes = msgpack.packb(message, use_bin_type=True)
        return payload

    def _check_size(self, payload: bytes, limit: int) -> None:
        if self.max_message_bytes is not None:
            limit = min(limit, self.max_message_bytes)
        if len(payload) > limit:
            raise MessageTooLarge(f"message of {len(payload)} bytes is over the limit of {limit}")

    def hello(self, client_id: str) -> Hello:
        """The HELLO frame for a connection of ``client_id``."""
        patterns = tuple((pattern.pattern, value) for pattern, value in self.channel_capacity)
        return Hello(
            PROTOCOL_VERSION,
            self.token,
            client_id,
            self.prefix,
            int(self.capacity),
            float(self.expiry),
            float(self.group_expiry),
            patterns,
        )


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


def _parse_host(url: str) -> tuple[str, str, int]:
    """``tcp://h:p``, ``tls://h:p`` or ``unix:///path`` -> (scheme, host or path, port)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{url!r}: a unix host needs a path, as unix:///run/broker.sock")
        return "unix", parts.path, 0
    if parts.scheme in ("tcp", "tls") and parts.hostname and parts.port:
        return parts.scheme, parts.hostname, parts.port
    raise ValueError(f"{url!r} is not tcp://host:port, tls://host:port or unix:///path")
