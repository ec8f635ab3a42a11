"""One event loop's connection to the daemon, for ``BrokerChannelLayer``.

Requests and their answers, pushed messages in per-channel buffers with their
acknowledgements, pulls and their cancellation, reconnects (``connecting``), and the
hand-over of a quiet connection to the next short-lived loop (``parking``). See
``broker.layer.channel_layer`` for the theory of operation.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import deque

from protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HANDSHAKE_FRAMES,
    MAX_PUSH_FRAME_BYTES,
    SENDER_BYTES,
    Cancelled,
    Confirm,
    Deliver,
    Error,
    Flushed,
    Frame,
    FrameDecoder,
    Handshake,
    Ok,
    Pong,
    ProtocolError,
    Push,
    Role,
    Welcome,
    client_id_of,
    encode_frame,
)

from .acks import Acks, Buffer, wake_one
from .connecting import Dialer, adopt, tls_refusal
from .errors import BrokerTLSError, BrokerUnavailable, LayerClosed, exception_for, is_refusal
from .identity import Family
from .memberships import Memberships
from .outages import Outages
from .parking import IdlePool, ParkedConnection, park_quietly
from .pulls import Pulls
from .settings import LayerSettings
from .window import WANTED_SEND_WINDOW, SendWindow

__all__ = ["ClientConnection", "LoopClient"]

log = logging.getLogger("channels_broker.layer")


class ClientConnection(asyncio.Protocol):
    """Bytes to frames for one socket; frames go to the loop client."""

    def __init__(self, client: LoopClient) -> None:
        self.client = client
        self.decoder = FrameDecoder(MAX_PUSH_FRAME_BYTES)
        self.handshake = Handshake(Role.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[BrokerTLSError | None] = client.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: Transport, no subclass

    def data_received(self, data: bytes) -> None:
        self.decoder.receive_data(data)
        try:
            handshake = self.handshake
            while (frame := self.decoder.next_frame()) is not None:
                if not handshake.is_ready or type(frame) in HANDSHAKE_FRAMES:
                    handshake.receive(frame)
                self.client.dispatch(self, frame)
        except ProtocolError as exc:
            log.error("protocol error from the broker: %s", exc)
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        refused = tls_refusal(exc, self.transport, self.handshake)
        if not self.lost.done():
            self.lost.set_result(refused)
        self.client.connection_lost(self, refused)


class LoopClient:
    """The layer's state on one event loop: connection, requests, local buffers."""

    def __init__(
        self,
        settings: LayerSettings,
        loop: asyncio.AbstractEventLoop,
        idle_pool: IdlePool,
        family: Family,
        outages: Outages,
        memberships: Memberships,
    ) -> None:
        self.settings = settings
        self.loop = loop
        self._idle_pool = idle_pool
        self._parked = parked = idle_pool.take()
        #: Our client id and the secret HELLO proves it with (a parked session's, if any).
        self.identity = parked.identity if parked else family.mint()
        self.client_id = self.identity.client_id
        self.conn: ClientConnection | None = None
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.closed = False
        #: new_channel() gave out our client id: this connection must not go to another loop.
        self.minted = False
        self._connecting: asyncio.Task[ClientConnection] | None = None
        self._dialer = Dialer(settings, loop, outages)
        self.next_id = itertools.count(1).__next__  # request ids
        #: The ids of the messages this client sends: (sender, next_seq()); see channel_layer.
        self.sender, self.next_seq = secrets.token_bytes(SENDER_BYTES), itertools.count(1).__next__
        #: The daemon refused this client for good (token, version): every call says so.
        self._refusal: Error | None = None
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._pulls = Pulls(self, loop)
        self.window = SendWindow(self, loop, *(parked.window if parked else ()))
        self._buffers: dict[str, Buffer] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._acks = Acks()
        #: The layer's memberships: added again on a store that lost them (``welcomed``).
        self.memberships = memberships
        self._output: list[bytes] = []
        self._flush_scheduled = False

    @property
    def is_connected(self) -> bool:
        return self.conn is not None

    def owns(self, channel: str) -> bool:
        return "!" in channel and client_id_of(channel) == self.client_id

    # -- connecting ----------------------------------------------------------

    async def connected(self, patient: bool = False) -> ClientConnection:
        """The live connection, connecting if need be (how long: ``Dialer.wait``)."""
        if self.conn is not None:
            return self.conn
        if self.closed:
            raise LayerClosed("the layer was closed on this event loop")
        if self._refusal is not None:  # a wrong token does not get better by retrying
            raise exception_for(self._refusal)
        if self._connecting is None or self._connecting.done():
            self._connecting = self.loop.create_task(self._connect())
            self._connecting.add_done_callback(self._reconnected)
        conn = await self._dialer.wait(self._connecting, patient)
        if conn.lost.done() and (refused := conn.lost.result()) is not None:
            raise refused  # refused (TLS) before our turn came: as a request would hear
        return conn

    async def message_limit(self) -> int:
        await self.connected()
        return self.max_message_bytes

    async def _connect(self) -> ClientConnection:
        parked, self._parked = self._parked, None
        if parked is not None and parked.is_alive():
            return await self._adopt(parked)
        conn = await self._dialer.connect(lambda: ClientConnection(self))
        # HELLO goes first; requests may follow it at once (the daemon answers in
        # order), which saves a round trip for short-lived async_to_sync loops.
        secret, window = self.identity.secret, WANTED_SEND_WINDOW
        hello = self.settings.hello(self.client_id, secret, window, True, acks_deliveries=True)
        again = [encode_frame(ack) for ack in self._pulls.acks_again()]
        self._output[:0] = [encode_frame(hello), *again, *self.window.resend()]
        self.conn = conn
        self._schedule_flush()
        return conn

    async def _adopt(self, parked: ParkedConnection) -> ClientConnection:
        """Take over a connection a closed loop left behind: no connect, no HELLO."""
        conn = await adopt(parked, self.loop, lambda: ClientConnection(self))
        conn.handshake.resume()
        conn.decoder.receive_data(parked.unread)
        self.max_message_bytes = parked.max_message_bytes
        self.conn = conn
        conn.data_received(b"")  # frames that were already read but not handled
        return conn

    def connection_lost(self, conn: ClientConnection, refused: Exception | None = None) -> None:
        self._dialer.outages.saw_alive()  # until now: a call failing next meets a restart
        if self.conn is not conn:
            return
        self.conn = None
        self._output.clear()
        self._acks.connection_lost(self._buffers)
        if refused is not None:  # the daemon refused our client certificate: no retry
            self._fail_calls(refused)
            return
        self._pulls.end(self._refusal)  # None: a pull is simply retried
        self.window.lost()  # unsettled sends wait for the next connection
        for future in self._pending.values():
            if not future.done():
                if self._refusal is not None:
                    future.set_result(self._refusal)
                else:
                    future.set_exception(BrokerUnavailable("connection to the broker lost"))
        self._pending.clear()
        wanted = self._waiters or self.window.unsettled or self.memberships
        if not self.closed and wanted and not self._refusal:
            # Someone waits for pushes, sends to resend, or memberships to keep: reconnect now.
            self._connecting = self.loop.create_task(self._connect())
            self._connecting.add_done_callback(self._reconnected)

    def _reconnected(self, task: asyncio.Task[ClientConnection]) -> None:
        if not task.cancelled() and isinstance(error := task.exception(), Exception):
            self._fail_calls(error)  # it failed for good (TLS): receivers hear why

    # -- output --------------------------------------------------------------

    def write(self, frame: Frame | bytes) -> None:  # a frame, or one encoded already
        self._queue_acks()  # before the frame: the daemon must free capacity first
        self._output.append(frame if isinstance(frame, bytes) else encode_frame(frame))
        self._schedule_flush()

    def _queue_acks(self) -> None:
        if self._acks:
            self._output += self._acks.frames()

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
        """Send a request and wait for its answer frame; raise for an ERROR answer."""
        await self.connected()
        request_id: int = frame.request_id  # type: ignore[union-attr]
        future: asyncio.Future[Frame] = self.loop.create_future()
        self._pending[request_id] = future
        self.write(frame)
        try:
            reply = await future
        finally:
            self._pending.pop(request_id, None)
        if type(reply) is Error:
            raise exception_for(reply)
        return reply

    def dispatch(self, conn: ClientConnection, frame: Frame) -> None:
        """Handle one frame from the daemon."""
        if isinstance(frame, Push):
            self._buffer_push(frame)
        elif isinstance(frame, (Ok, Error, Deliver, Cancelled, Pong)):
            self._answer(frame)
        elif isinstance(frame, Confirm):
            self.window.confirmed(frame)
        elif isinstance(frame, Welcome):
            self.max_message_bytes = frame.max_message_bytes
            self.window.open(frame.send_window)
            for group_add in self.memberships.welcomed(frame.incarnation, self.next_id):
                self.write(group_add)  # its answer goes unread
        elif isinstance(frame, Flushed):
            self._buffers.clear()
            self.memberships.clear()
            self._acks.counts.clear()  # what it kept of fan-outs is still told

    def _answer(self, frame: Ok | Error | Deliver | Cancelled | Pong) -> None:
        request_id = frame.request_id
        if request_id == 0 and isinstance(frame, Error):
            self._connection_error(frame)
            return
        future = self._pending.pop(request_id, None)
        if future is None:
            self.window.answer(frame) or self._pulls.answer(frame)  # a numbered send's, or a pull's
        elif not future.done():
            future.set_result(frame)

    def _connection_error(self, frame: Error) -> None:
        log.error("the broker closed the connection: %s", frame.message)
        at_hello = self.conn is not None and not self.conn.handshake.is_ready
        self._pulls.end(frame)
        for future in self._pending.values():
            if not future.done():
                future.set_result(frame)
        self._pending.clear()
        if is_refusal(frame, at_hello=at_hello):
            self._refusal = frame
            self._fail_calls(exception_for(frame))  # receives of pushed channels, too

    # -- receiving -----------------------------------------------------------

    async def receive(self, channel: str) -> bytes:
        while True:
            payload = self._take_buffered(channel)
            if payload is not None:
                return payload
            if self.owns(channel):
                await self._wait_for_push(channel)
            else:
                payload = await self._pulls.pull(channel)
                if payload is not None:
                    return payload

    def _take_buffered(self, channel: str) -> bytes | None:
        buffer = self._buffers.get(channel)
        if not buffer:  # the usual case of a receive that waits: no clock read
            self._buffers.pop(channel, None)
            return None
        now = self.loop.time()
        while buffer:
            deadline, payload, held = buffer.popleft()
            if held:
                self._acks.owe(channel)
                self._schedule_flush()
            if deadline >= now:
                if not buffer:
                    del self._buffers[channel]
                return payload
        self._buffers.pop(channel, None)
        return None

    def keep(self, channel: str, payload: bytes, ttl_ms: int, held: bool) -> None:
        """Buffer a message of ``channel`` for its next ``receive``."""
        deadline = self.loop.time() + ttl_ms / 1000
        self._buffers.setdefault(channel, deque()).append((deadline, payload, held))
        self._wake_one(channel)

    def _buffer_push(self, frame: Push) -> None:
        if frame.fanout_capacity:  # a group fan-out: its capacity applies here
            self._acks.keep_fanout(frame, self._buffers, self._waiters, self.loop.time())
            self._acks.report_later(self.loop, self._schedule_flush)
            return
        for channel in frame.channels:
            self.keep(channel, frame.payload, frame.ttl_ms, held=True)

    async def _wait_for_push(self, channel: str) -> None:
        if self.conn is None:  # the daemon pushes only to a connected owner
            await self.connected(patient=True)
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
        wake_one(self._waiters.get(channel), skip)

    def _fail_calls(self, error: Exception) -> None:  # pulls, requests, receives of pushes
        self._pulls.end(error=error)
        self.window.fail(error)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for waiter in [w for waiters in self._waiters.values() for w in waiters if not w.done()]:
            waiter.set_exception(error)

    # -- closing -------------------------------------------------------------

    async def close(self, park: bool = False) -> None:
        """Close; with ``park``, hand an idle connection to the next loop instead."""
        await self.window.settle(self.settings.connect_timeout_s)
        self.closed = True
        if park and park_quietly(self, self._idle_pool):
            return
        if self._parked is not None:
            self._parked.sock.close()
        if self._connecting is not None:
            self._connecting.cancel()
        self._fail_calls(LayerClosed("the layer was closed on this event loop"))
        conn, self.conn = self.conn, None
        if conn is not None and conn.transport is not None:
            self._output.clear()
            conn.transport.close()
            await conn.lost

    @property
    def is_quiet(self) -> bool:  # for parking: nothing pending, buffered, unwritten or pulled
        return not (self._pending or self._buffers or self._output) and self._pulls.is_quiet
