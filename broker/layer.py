"""``BrokerChannelLayer``: the Django Channels layer that talks to a channels-broker daemon.

Theory of operation. One instance serves a whole process, but sockets belong to
event loops, so the layer keeps one ``_LoopClient`` per loop (the server's main
loop, and the fresh loop ``async_to_sync`` makes for each call from sync code),
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
import os
import random
import secrets
import socket
import ssl
import threading
import types
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import msgpack
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from protocol import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    Cancelled,
    Deliver,
    Error,
    ErrorCode,
    Flush,
    Flushed,
    Frame,
    FrameDecoder,
    GroupAdd,
    GroupDiscard,
    GroupSend,
    Handshake,
    Hello,
    Ok,
    Ping,
    Pong,
    ProtocolError,
    Push,
    Receive,
    Role,
    Send,
    State,
    Welcome,
    encode_frame,
)

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


class MessageTooLarge(ValueError):
    """The serialized message is over the daemon's size limit; nothing was sent."""


class BrokerUnavailable(ConnectionError):
    """No daemon could be reached within the timeout, or the connection dropped mid-request."""


class LayerClosed(RuntimeError):
    """``close()`` ended the layer while this call was waiting."""


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
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        self._idle = _IdlePool()
        # Parked sockets belong to no loop; close them when the layer goes away.
        weakref.finalize(self, self._idle.close_all)

    # -- the Channels layer API --------------------------------------------

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``channel``; raise ``ChannelFull`` if it is at capacity."""
        self.require_valid_channel_name(channel)
        payload = self._serialize(message)
        client = self._client()
        self._check_size(payload, await client.message_limit())
        reply = await client.request(Send(client.next_id(), channel, payload))
        _raise_for(reply)

    async def receive(self, channel: str) -> dict[str, Any]:
        """Wait for and return the next message on ``channel``. Safe to cancel."""
        self.require_valid_channel_name(channel)
        client = self._client()
        payload = await client.receive(channel)
        message: dict[str, Any] = msgpack.unpackb(payload, raw=False)
        return message

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name owned by this event loop's connection."""
        return f"{prefix}.{self._client().client_id}!{secrets.token_hex(6)}"

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        client = self._client()
        _raise_for(await client.request(GroupAdd(client.next_id(), group, channel)))
        if client.owns(channel):
            client.memberships[(group, channel)] = client.loop.time()

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        client = self._client()
        client.memberships.pop((group, channel), None)
        _raise_for(await client.request(GroupDiscard(client.next_id(), group, channel)))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send to every member; members at capacity are skipped (never ``ChannelFull``)."""
        self.require_valid_group_name(group)
        payload = self._serialize(message)
        client = self._client()
        self._check_size(payload, await client.message_limit())
        reply = await client.request(GroupSend(client.next_id(), group, payload))
        _raise_for(reply)
        if isinstance(reply, Ok) and reply.count:
            log.info("group_send to %s skipped %d full members", group, reply.count)

    async def flush(self) -> None:
        """Empty every channel and group of this layer's prefix, for every client."""
        client = self._client()
        _raise_for(await client.request(Flush(client.next_id())))

    async def close(self) -> None:
        """Close this event loop's connection and idle ones; waiting calls raise ``LayerClosed``."""
        self._idle.close_all()
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def ping(self) -> float:
        """Round trip to the daemon in seconds."""
        client = self._client()
        started = asyncio.get_running_loop().time()
        _raise_for(await client.request(Ping(client.next_id())))
        return asyncio.get_running_loop().time() - started

    # -- internals -----------------------------------------------------------

    def _client(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = _LoopClient(self, loop, self._idle.take())
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


def _raise_for(reply: Frame) -> None:
    """Turn an ERROR answer into the exception Channels code expects."""
    if not isinstance(reply, Error):
        return
    code = reply.error_code
    if code is ErrorCode.CHANNEL_FULL:
        raise ChannelFull(reply.message)
    if code is ErrorCode.MESSAGE_TOO_LARGE:
        raise MessageTooLarge(reply.message)
    if code is ErrorCode.INVALID_NAME:
        raise TypeError(reply.message)
    if code in (ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.SHUTTING_DOWN):
        raise BrokerUnavailable(reply.message)
    raise RuntimeError(f"broker error {reply.code}: {reply.message}")


def _close_with_loop(
    loop: asyncio.AbstractEventLoop,
    clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient],
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


class _Connection(asyncio.Protocol):
    """Bytes to frames for one socket; frames go to the loop client."""

    def __init__(self, client: _LoopClient) -> None:
        self.client = client
        self.decoder = FrameDecoder(MAX_FRAME_BYTES)
        self.handshake = Handshake(Role.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = client.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.decoder.receive_data(data)
        try:
            while (frame := self.decoder.next_frame()) is not None:
                self.handshake.receive(frame)
                self.client.dispatch(self, frame)
        except ProtocolError as exc:
            log.error("protocol error from the broker: %s", exc)
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.client.connection_lost(self)


class _LoopClient:
    """The layer's state on one event loop: connection, requests, local buffers."""

    def __init__(
        self,
        layer: BrokerChannelLayer,
        loop: asyncio.AbstractEventLoop,
        parked: _ParkedConnection | None = None,
    ) -> None:
        self.layer = layer
        self.loop = loop
        self._parked = parked
        self.client_id = parked.client_id if parked else secrets.token_hex(8)
        self.conn: _Connection | None = None
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.closed = False
        self._connecting: asyncio.Task[_Connection] | None = None
        self._request_ids = 0
        self._pending: dict[int, asyncio.Future[Frame | None]] = {}
        self._pulls: set[int] = set()
        # Cancelled pulls whose answer (DELIVER or CANCELLED) has not come yet, with a
        # future set when it comes: a new pull of that channel waits for it, or a
        # late DELIVER would overtake the message of the new pull.
        self._orphans: dict[int, tuple[str, asyncio.Future[None]]] = {}
        self._buffers: dict[str, deque[tuple[float, bytes, bool]]] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._acks: dict[str, int] = {}
        # (group, own channel) -> when added: said again after a reconnect, since a
        # daemon that restarted on the memory backend has forgotten them.
        self.memberships: dict[tuple[str, str], float] = {}
        self._output: list[bytes] = []
        self._flush_scheduled = False

    def next_id(self) -> int:
        self._request_ids += 1
        return self._request_ids

    def owns(self, channel: str) -> bool:
        head = channel[: channel.find("!")]
        return "!" in channel and head[head.rfind(".") + 1 :] == self.client_id

    # -- connecting ----------------------------------------------------------

    async def connected(self) -> _Connection:
        """The live connection, connecting (with backoff) for up to ``connect_timeout``."""
        if self.conn is not None:
            return self.conn
        if self.closed:
            raise LayerClosed("the layer was closed on this event loop")
        if self._connecting is None or self._connecting.done():
            self._connecting = self.loop.create_task(self._connect_with_backoff())
        try:
            return await asyncio.wait_for(
                asyncio.shield(self._connecting), self.layer.connect_timeout
            )
        except TimeoutError:
            raise BrokerUnavailable(f"no broker reachable at {self._host_names()}") from None

    async def message_limit(self) -> int:
        await self.connected()
        return self.max_message_bytes

    async def _connect_with_backoff(self) -> _Connection:
        parked, self._parked = self._parked, None
        if parked is not None and parked.is_alive():
            return await self._adopt(parked)
        delay = RECONNECT_FIRST_DELAY_S
        while True:
            for host in _rotated(self.layer.hosts):
                try:
                    return await self._open(host)
                except OSError as exc:
                    log.debug("cannot connect to %s: %s", host, exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, RECONNECT_MAX_DELAY_S)

    async def _open(self, host: tuple[str, str, int]) -> _Connection:
        scheme, address, port = host
        factory = lambda: _Connection(self)  # noqa: E731
        if scheme == "unix":
            _, conn = await self.loop.create_unix_connection(factory, address)
        else:
            tls = None
            if scheme == "tls":
                tls = self.layer.ssl_context or ssl.create_default_context()
            _, conn = await self.loop.create_connection(factory, address, port, ssl=tls)
        # HELLO goes first; requests may follow it at once (the daemon answers in
        # order), which saves a round trip for short-lived async_to_sync loops.
        self._output[:0] = [encode_frame(self.layer.hello(self.client_id)), *self._rejoin()]
        self.conn = conn
        self._schedule_flush()
        return conn

    def _rejoin(self) -> list[bytes]:
        """GROUP_ADD frames for the live memberships; their answers are not awaited."""
        oldest = self.loop.time() - self.layer.group_expiry
        for key in [key for key, added in self.memberships.items() if added < oldest]:
            del self.memberships[key]
        return [
            encode_frame(GroupAdd(self.next_id(), group, channel))
            for group, channel in self.memberships
        ]

    async def _adopt(self, parked: _ParkedConnection) -> _Connection:
        """Take over a connection a closed loop left behind: no connect, no HELLO."""
        _, conn = await self.loop.create_connection(lambda: _Connection(self), sock=parked.sock)
        conn.handshake.state = State.READY
        conn.decoder.receive_data(parked.unread)
        self.max_message_bytes = parked.max_message_bytes
        self.conn = conn
        conn.data_received(b"")  # frames that were already read but not handled
        return conn

    def _host_names(self) -> str:
        return ", ".join(f"{s}://{a}" + (f":{p}" if p else "") for s, a, p in self.layer.hosts)

    def connection_lost(self, conn: _Connection) -> None:
        if self.conn is not conn:
            return
        self.conn = None
        self._output.clear()
        self._resolve_orphans()
        for request_id, future in list(self._pending.items()):
            if not future.done():
                if request_id in self._pulls:
                    future.set_result(None)  # a pull is simply retried
                else:
                    future.set_exception(BrokerUnavailable("connection to the broker lost"))
        self._pending.clear()
        self._pulls.clear()
        if not self.closed and self._waiters:
            # Someone waits for pushes: reconnect now so they arrive.
            self._connecting = self.loop.create_task(self._connect_with_backoff())

    # -- output --------------------------------------------------------------

    def write(self, frame: Frame) -> None:
        if self._acks:
            self._output.append(encode_frame(Ack(tuple(self._acks.items()))))
            self._acks.clear()
        self._output.append(encode_frame(frame))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn = self.conn
        if conn is None or conn.transport is None:
            return
        if self._acks:
            self._output.append(encode_frame(Ack(tuple(self._acks.items()))))
            self._acks.clear()
        if self._output:
            conn.transport.write(b"".join(self._output))
            self._output.clear()

    # -- requests ------------------------------------------------------------

    async def request(self, frame: Frame) -> Frame:
        """Send a request and wait for its answer frame."""
        await self.connected()
        request_id: int = frame.request_id  # type: ignore[union-attr]
        future: asyncio.Future[Frame | None] = self.loop.create_future()
        self._pending[request_id] = future
        self.write(frame)
        try:
            reply = await future
        finally:
            self._pending.pop(request_id, None)
        assert reply is not None  # only pulls are answered with None
        if isinstance(reply, Error) and reply.error_code is ErrorCode.AUTH_FAILED:
            raise PermissionError(reply.message)
        return reply

    def dispatch(self, conn: _Connection, frame: Frame) -> None:
        """Handle one frame from the daemon."""
        if isinstance(frame, Push):
            self._buffer_push(frame)
        elif isinstance(frame, (Ok, Error, Deliver, Cancelled, Pong)):
            self._answer(frame)
        elif isinstance(frame, Welcome):
            self.max_message_bytes = frame.max_message_bytes
        elif isinstance(frame, Flushed):
            self._buffers.clear()
            self.memberships.clear()
            self._acks.clear()

    def _answer(self, frame: Ok | Error | Deliver | Cancelled | Pong) -> None:
        request_id = frame.request_id
        if request_id == 0 and isinstance(frame, Error):
            self._connection_error(frame)
            return
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            self._pulls.discard(request_id)
            future.set_result(frame)
            return
        if future is not None and request_id in self._pulls:
            # The pull was cancelled in this very loop pass and its task has not run
            # ``_cancel_pull`` yet: the answer is final, so keep what it delivered.
            self._pulls.discard(request_id)
            if isinstance(frame, Deliver):
                self._keep(frame.channel, frame.payload, frame.ttl_ms, held=False)
            return
        orphan = self._orphans.pop(request_id, None)
        if orphan is not None:
            channel, resolved = orphan
            if isinstance(frame, Deliver):
                self._keep(channel, frame.payload, frame.ttl_ms, held=False)
            resolved.set_result(None)

    def _resolve_orphans(self) -> None:
        for _, resolved in self._orphans.values():
            resolved.set_result(None)
        self._orphans.clear()

    def _connection_error(self, frame: Error) -> None:
        log.error("the broker closed the connection: %s", frame.message)
        for future in self._pending.values():
            if not future.done():
                future.set_result(frame)
        self._pending.clear()
        self._pulls.clear()

    # -- receiving -----------------------------------------------------------

    async def receive(self, channel: str) -> bytes:
        while True:
            payload = self._take_buffered(channel)
            if payload is not None:
                return payload
            if self.owns(channel):
                await self._wait_for_push(channel)
            else:
                payload = await self._pull(channel)
                if payload is not None:
                    return payload

    def _take_buffered(self, channel: str) -> bytes | None:
        buffer = self._buffers.get(channel)
        now = self.loop.time()
        while buffer:
            deadline, payload, held = buffer.popleft()
            if held:
                self._acks[channel] = self._acks.get(channel, 0) + 1
                self._schedule_flush()
            if deadline >= now:
                if not buffer:
                    del self._buffers[channel]
                return payload
        self._buffers.pop(channel, None)
        return None

    def _keep(self, channel: str, payload: bytes, ttl_ms: int, held: bool) -> None:
        deadline = self.loop.time() + ttl_ms / 1000
        self._buffers.setdefault(channel, deque()).append((deadline, payload, held))
        self._wake_one(channel)

    def _buffer_push(self, frame: Push) -> None:
        for channel in frame.channels:
            self._keep(channel, frame.payload, frame.ttl_ms, held=True)

    async def _wait_for_push(self, channel: str) -> None:
        await self.connected()  # the daemon pushes only to a connected owner
        if channel in self._buffers:
            return  # a push arrived while we connected
        waiter: asyncio.Future[None] = self.loop.create_future()
        waiters = self._waiters.setdefault(channel, deque())
        waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            # Cancelled, perhaps just after a push woke us: another receiver of this
            # channel must not sleep on a message we leave in the buffer.
            if channel in self._buffers:
                self._wake_one(channel, skip=waiter)
            raise
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(channel, None)

    def _wake_one(self, channel: str, skip: asyncio.Future[None] | None = None) -> None:
        for waiter in self._waiters.get(channel, ()):
            if waiter is not skip and not waiter.done():
                waiter.set_result(None)
                return

    async def _pull(self, channel: str) -> bytes | None:
        """One RECEIVE; None if the connection dropped (the caller retries)."""
        await self.connected()
        unresolved = [done for ch, done in self._orphans.values() if ch == channel]
        if unresolved:
            # Shielded: our cancellation must not cancel the shared future.
            await asyncio.shield(asyncio.gather(*unresolved))
            return None  # the caller looks at the buffer first
        request_id = self.next_id()
        future: asyncio.Future[Frame | None] = self.loop.create_future()
        self._pending[request_id] = future
        self._pulls.add(request_id)
        self.write(Receive(request_id, channel))
        try:
            reply = await future
        except asyncio.CancelledError:
            self._cancel_pull(request_id, channel, future)
            raise
        if isinstance(reply, Deliver):
            if reply.ttl_ms > 0:
                return reply.payload
            return None
        if reply is not None:
            _raise_for(reply)
        return None

    def _cancel_pull(self, request_id: int, channel: str, future: asyncio.Future[Any]) -> None:
        self._pending.pop(request_id, None)
        if request_id not in self._pulls and future.cancelled():
            return  # answered meanwhile (see ``_answer``), or the connection was lost
        self._pulls.discard(request_id)
        if future.done() and not future.cancelled():
            reply = future.result()
            if isinstance(reply, Deliver):  # it arrived as we were cancelled: keep it
                self._keep(channel, reply.payload, reply.ttl_ms, held=False)
        elif self.conn is not None:
            self._orphans[request_id] = (channel, self.loop.create_future())
            self.write(Cancel(request_id))

    # -- closing -------------------------------------------------------------

    async def close(self, park: bool = False) -> None:
        """Close; with ``park``, hand an idle connection to the next loop instead."""
        self.closed = True
        if park and self._park():
            return
        if self._parked is not None:
            self._parked.sock.close()
        if self._connecting is not None:
            self._connecting.cancel()
        self._resolve_orphans()
        error = LayerClosed("the layer was closed on this event loop")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
        conn, self.conn = self.conn, None
        if conn is not None and conn.transport is not None:
            self._output.clear()
            conn.transport.close()
            await conn.lost

    def _park(self) -> bool:
        """Keep this loop's connection for the next loop, if it is quiet; True if kept.

        ``async_to_sync`` makes a loop per call; without this every call from sync
        code would pay a TCP connect and a HELLO. The socket is duplicated, so the
        transport's close leaves the connection (and its daemon session) open.
        """
        conn = self.conn
        quiet = not (self._pending or self._orphans or self._buffers or self._output)
        if conn is None or conn.transport is None or not quiet:
            return False
        self._flush()  # acknowledgements still owed
        if conn.transport.get_write_buffer_size():
            return False
        sock = conn.transport.get_extra_info("socket")
        parked = _ParkedConnection(
            sock.dup(), self.client_id, conn.decoder.unread(), self.max_message_bytes
        )
        self.conn = None
        if not self.layer._idle.put(parked):
            parked.sock.close()
        conn.transport.abort()
        return True


class _ParkedConnection:
    """A live daemon connection between two event loops of one process."""

    __slots__ = ("client_id", "max_message_bytes", "pid", "sock", "unread")

    def __init__(
        self, sock: socket.socket, client_id: str, unread: bytes, max_message_bytes: int
    ) -> None:
        self.sock = sock
        self.client_id = client_id
        self.unread = unread
        self.max_message_bytes = max_message_bytes
        self.pid = os.getpid()

    def is_alive(self) -> bool:
        """Open and ours: not closed by the daemon, not inherited through fork()."""
        if self.pid != os.getpid():
            return False
        try:
            peeked = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            peeked = b""
        if not peeked:
            self.sock.close()
        return bool(peeked)


class _IdlePool:
    """Parked connections of one layer, shared by the threads that run loops."""

    #: Parked connections kept; more concurrent sync callers open their own.
    SIZE = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parked: list[_ParkedConnection] = []

    def put(self, parked: _ParkedConnection) -> bool:
        with self._lock:
            if len(self._parked) >= self.SIZE:
                return False
            self._parked.append(parked)
            return True

    def take(self) -> _ParkedConnection | None:
        with self._lock:
            return self._parked.pop() if self._parked else None

    def close_all(self) -> None:
        with self._lock:
            parked, self._parked = self._parked, []
        for connection in parked:
            connection.sock.close()


def _rotated(hosts: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Hosts starting at a random one, so clients spread over several daemons."""
    start = random.randrange(len(hosts))
    return hosts[start:] + hosts[:start]
