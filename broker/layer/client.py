"""One event loop's connection to the daemon, for ``BrokerChannelLayer``.

Requests and their answers, pushed messages in per-channel buffers with their
acknowledgements, pulls and their cancellation, reconnects with backoff, and the
hand-over of a quiet connection to the next short-lived loop (``parking``).
See ``broker.layer`` for the theory of operation.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any

from channels.exceptions import ChannelFull

from protocol import (
    Ack,
    Cancel,
    Cancelled,
    Deliver,
    Error,
    ErrorCode,
    Flushed,
    Frame,
    FrameDecoder,
    GroupAdd,
    Handshake,
    Ok,
    Pong,
    ProtocolError,
    Push,
    Receive,
    Role,
    State,
    Welcome,
    client_id_of,
    encode_frame,
)

from .parking import ParkedConnection

if TYPE_CHECKING:
    from .channel_layer import BrokerChannelLayer

__all__ = [
    "BrokerUnavailable",
    "ClientConnection",
    "LayerClosed",
    "LoopClient",
    "MessageTooLarge",
    "raise_for",
]

log = logging.getLogger("channels_broker.layer")

#: What the daemon accepts by default; the daemon's WELCOME gives the real figure.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Largest frame we read: the message limit plus a group send's member list.
MAX_FRAME_BYTES = 80 * 1024 * 1024
#: Reconnect backoff: first delay, cap, in seconds; each attempt is jittered.
RECONNECT_FIRST_DELAY_S = 0.05
RECONNECT_MAX_DELAY_S = 2.0


class MessageTooLarge(ValueError):
    """The serialized message is over the daemon's size limit; nothing was sent."""


class BrokerUnavailable(ConnectionError):
    """No daemon could be reached within the timeout, or the connection dropped mid-request."""


class LayerClosed(RuntimeError):
    """``close()`` ended the layer while this call was waiting."""


def raise_for(reply: Frame) -> None:
    """Turn an ERROR answer into the exception Channels code expects."""
    if not isinstance(reply, Error):
        return
    code = reply.error_code
    if code is ErrorCode.CHANNEL_FULL:
        raise ChannelFull(reply.message)
    if code is ErrorCode.AUTH_FAILED:
        raise PermissionError(f"the broker refused the token: {reply.message}")
    if code is ErrorCode.MESSAGE_TOO_LARGE:
        raise MessageTooLarge(reply.message)
    if code is ErrorCode.INVALID_NAME:
        raise TypeError(reply.message)
    if code in (ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.SHUTTING_DOWN):
        raise BrokerUnavailable(reply.message)
    raise RuntimeError(f"broker error {reply.code}: {reply.message}")


class ClientConnection(asyncio.Protocol):
    """Bytes to frames for one socket; frames go to the loop client."""

    def __init__(self, client: LoopClient) -> None:
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


class LoopClient:
    """The layer's state on one event loop: connection, requests, local buffers."""

    def __init__(
        self,
        layer: BrokerChannelLayer,
        loop: asyncio.AbstractEventLoop,
        parked: ParkedConnection | None = None,
    ) -> None:
        self.layer = layer
        self.loop = loop
        self._parked = parked
        self.client_id = parked.client_id if parked else secrets.token_hex(8)
        self.conn: ClientConnection | None = None
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.closed = False
        #: new_channel() gave out a name with our client id: messages may come for it,
        #: so this connection must not be handed to another loop (which would take
        #: pushes for channels it never reads, and drop them when it closes).
        self.minted = False
        self._connecting: asyncio.Task[ClientConnection] | None = None
        self._request_ids = 0
        #: The daemon refused this client for good (token, version): every call says so.
        self._refusal: Error | None = None
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
        return "!" in channel and client_id_of(channel) == self.client_id

    # -- connecting ----------------------------------------------------------

    async def connected(self) -> ClientConnection:
        """The live connection, connecting (with backoff) for up to ``connect_timeout``."""
        if self.conn is not None:
            return self.conn
        if self.closed:
            raise LayerClosed("the layer was closed on this event loop")
        if self._refusal is not None:
            raise_for(self._refusal)  # a wrong token does not get better by retrying
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

    async def _connect_with_backoff(self) -> ClientConnection:
        parked, self._parked = self._parked, None
        if parked is not None and parked.is_alive():
            return await self._adopt(parked)
        delay = RECONNECT_FIRST_DELAY_S
        while True:
            for host in rotated(self.layer.hosts):
                try:
                    return await self._open(host)
                except OSError as exc:
                    log.debug("cannot connect to %s: %s", host, exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, RECONNECT_MAX_DELAY_S)

    async def _open(self, host: tuple[str, str, int]) -> ClientConnection:
        scheme, address, port = host
        factory = lambda: ClientConnection(self)  # noqa: E731
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

    async def _adopt(self, parked: ParkedConnection) -> ClientConnection:
        """Take over a connection a closed loop left behind: no connect, no HELLO."""
        _, conn = await self.loop.create_connection(
            lambda: ClientConnection(self), sock=parked.sock
        )
        conn.handshake.state = State.READY
        conn.decoder.receive_data(parked.unread)
        self.max_message_bytes = parked.max_message_bytes
        self.conn = conn
        conn.data_received(b"")  # frames that were already read but not handled
        return conn

    def _host_names(self) -> str:
        return ", ".join(f"{s}://{a}" + (f":{p}" if p else "") for s, a, p in self.layer.hosts)

    def connection_lost(self, conn: ClientConnection) -> None:
        if self.conn is not conn:
            return
        self.conn = None
        self._output.clear()
        self._resolve_orphans()
        for request_id, future in list(self._pending.items()):
            if not future.done():
                if self._refusal is not None:
                    future.set_result(self._refusal)
                elif request_id in self._pulls:
                    future.set_result(None)  # a pull is simply retried
                else:
                    future.set_exception(BrokerUnavailable("connection to the broker lost"))
        self._pending.clear()
        self._pulls.clear()
        if not self.closed and self._waiters and self._refusal is None:
            # Someone waits for pushes: reconnect now so they arrive.
            self._connecting = self.loop.create_task(self._connect_with_backoff())

    # -- output --------------------------------------------------------------

    def write(self, frame: Frame) -> None:
        self._queue_acks()  # before the frame: the daemon must free capacity first
        self._output.append(encode_frame(frame))
        self._schedule_flush()

    def _queue_acks(self) -> None:
        if self._acks:
            self._output.append(encode_frame(Ack(tuple(self._acks.items()))))
            self._acks.clear()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn = self.conn
        if conn is None or conn.transport is None:
            return
        self._queue_acks()
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
        return reply

    def dispatch(self, conn: ClientConnection, frame: Frame) -> None:
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
        if frame.error_code in (ErrorCode.AUTH_FAILED, ErrorCode.UNSUPPORTED_VERSION):
            self._refusal = frame
            for waiters in self._waiters.values():  # receives of pushed channels, too
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(PermissionError(frame.message))
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
            raise_for(reply)
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
        if conn is None or conn.transport is None or not quiet or self.minted:
            return False
        self._flush()  # acknowledgements still owed
        if conn.transport.get_write_buffer_size():
            return False
        sock = conn.transport.get_extra_info("socket")
        parked = ParkedConnection(
            sock.dup(), self.client_id, conn.decoder.unread(), self.max_message_bytes
        )
        self.conn = None
        if not self.layer.idle_pool.put(parked):
            parked.sock.close()
        conn.transport.abort()
        return True


def rotated(hosts: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Hosts starting at a random one, so clients spread over several daemons."""
    start = random.randrange(len(hosts))
    return hosts[start:] + hosts[:start]
