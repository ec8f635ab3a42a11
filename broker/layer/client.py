"""One event loop's connection to the daemon, for ``BrokerChannelLayer``: requests and
their answers, pushed messages in per-channel buffers with their acks, pulls and their
cancellation, reconnects (``connecting``), and the hand-over of a quiet connection to the
next short-lived loop (``parking``); see ``channel_layer``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets

from protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FANOUT_VERSION,
    HANDSHAKE_FRAMES,
    MAX_PUSH_FRAME_BYTES,
    NUMBERED_GROUP_SEND_VERSION,
    SENDER_BYTES,
    Cancelled,
    Confirm,
    Deliver,
    Error,
    ErrorCode,
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

from .acks import Inbox, Unconfirmed
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
        self.settings, self.loop, self._idle_pool = settings, loop, idle_pool
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
        self._dialer, self._outages = Dialer(settings, loop, outages), outages
        #: Requests written before WELCOME, written again if it refuses (``_older_daemon``).
        self._unwelcomed: dict[int, bytes] = {}
        self._replay: list[bytes] = []
        self.next_id = itertools.count(1).__next__  # request ids
        #: The ids of the messages this client sends: (sender, next_seq()); see channel_layer.
        self.sender, self.next_seq = secrets.token_bytes(SENDER_BYTES), itertools.count(1).__next__
        #: The daemon refused this client for good (token, version): every call says so.
        self._refusal: Error | None = None
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._pulls = Pulls(self, loop)
        self.window = SendWindow(self, loop, *(parked.window if parked else ()))
        self.inbox = Inbox(loop, self._schedule_flush)  # pushed messages, what is owed
        self._acks = self.inbox.acks
        self.unconfirmed = Unconfirmed()  # numbered group sends (``acks``)
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
        adopting = self._parked is not None and self._parked.is_alive()  # no network wait
        task = self._connecting
        conn = await (task if adopting else self._dialer.wait(task, patient))
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
        secret, window, version = self.identity.secret, WANTED_SEND_WINDOW, self._outages.version
        hello = self.settings.hello(self.client_id, secret, window, True, True, version)
        again = [encode_frame(ack) for ack in self._pulls.acks_again()]
        numbered = version >= NUMBERED_GROUP_SEND_VERSION
        resent = sorted(self.window.resend() + self.unconfirmed.resend(self.next_id, numbered))
        replay, self._replay, self._unwelcomed = self._replay, [], {}
        self._output[:0] = [encode_frame(hello), *again, *(f for _, f in resent), *replay]
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
        if self.conn is not conn:
            return  # not ours (yet): one reset as it was made says no daemon was alive
        self._dialer.outages.saw_alive()  # until now: a call failing next meets a restart
        self.conn = None
        self._output.clear()
        self._acks.connection_lost(self.inbox.buffers)
        if refused is not None:  # the daemon refused our client certificate: no retry
            self._fail_calls(refused)
            return
        self._pulls.end(self._refusal)  # None: a pull is simply retried
        self.window.lost()  # unsettled sends wait for the next connection
        self.unconfirmed.lost()
        if not self._replay:  # else their callers wait for the answers on the next one
            for future in self._pending.values():
                if not future.done():
                    if self._refusal is not None:
                        future.set_result(self._refusal)
                    else:
                        future.set_exception(BrokerUnavailable("connection to the broker lost"))
            self._pending.clear()
        waits = (self.inbox.waiters, self.window.unsettled, self.unconfirmed, self.memberships)
        wanted = any(waits) or self._replay
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

    def group_send_numbered(self, group: str, payload: bytes) -> bool:
        """Write a numbered GROUP_SEND and say True, if the daemon takes them and the
        bound leaves room (``acks.Unconfirmed``); else False: send it as a request."""
        frame = self.conn and self.unconfirmed.number(self.window, group, payload)
        if frame:
            self.write(frame)
        return bool(frame)

    async def request(self, frame: Frame) -> Frame:
        """Send a request and wait for its answer frame; raise for an ERROR answer."""
        await self.connected()
        request_id: int = frame.request_id  # type: ignore[union-attr]
        future: asyncio.Future[Frame] = self.loop.create_future()
        self._pending[request_id] = future
        data = encode_frame(frame)
        if self.conn is not None and not self.conn.handshake.is_ready:
            self._unwelcomed[request_id] = data  # written again if HELLO is refused
        self.write(data)
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
            self.inbox.keep_push(frame)
        elif isinstance(frame, (Ok, Error, Deliver, Cancelled, Pong)):
            self._answer(frame)
        elif isinstance(frame, Confirm):
            self.unconfirmed.confirmed(frame, self.window)
        elif isinstance(frame, Welcome):
            self._unwelcomed.clear()
            self.max_message_bytes = frame.max_message_bytes
            numbered = frame.version >= NUMBERED_GROUP_SEND_VERSION
            self.window.open(frame.send_window, numbered)
            for group_add in self.memberships.welcomed(frame.incarnation, self.next_id):
                self.write(group_add)  # its answer goes unread
        elif isinstance(frame, Flushed):
            self.inbox.buffers.clear()
            self.memberships.clear()
            self._acks.counts.clear()  # what it kept of fan-outs is still told

    def _answer(self, frame: Ok | Error | Deliver | Cancelled | Pong) -> None:
        request_id = frame.request_id
        if request_id == 0 and isinstance(frame, Error):
            self._connection_error(frame)
            return
        future = self._pending.pop(request_id, None)
        if future is None:  # a numbered send's, a numbered group send's, or a pull's
            window = self.window
            window.answer(frame) or self.unconfirmed.answer(frame, window) or self._pulls.answer(
                frame
            )
        elif not future.done():
            future.set_result(frame)

    def _older_daemon(self, frame: Error) -> bool:
        """A daemon older than this layer refused HELLO's version: say the version before
        numbered group sends from now on (every loop of the layer), and write again on
        the next connection the requests it never read; True. Else False."""
        outages = self._outages
        if frame.error_code is not ErrorCode.UNSUPPORTED_VERSION:
            return False
        if outages.version <= FANOUT_VERSION:
            return False
        log.warning("the broker is older than this layer: %s; speaking version 2", frame.message)
        outages.version = FANOUT_VERSION
        self._replay, self._unwelcomed = list(self._unwelcomed.values()), {}
        return True

    def _connection_error(self, frame: Error) -> None:
        at_hello = self.conn is not None and not self.conn.handshake.is_ready
        if at_hello and self._older_daemon(frame):
            return  # the daemon closes the connection; the next one says version 2
        log.error("the broker closed the connection: %s", frame.message)
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
        """The next message of ``channel``, of which ``inbox.take`` found none: a push
        to one of our channels is waited for; another channel is pulled."""
        inbox, owned = self.inbox, self.owns(channel)
        while True:
            if owned:
                if self.conn is None:  # the daemon pushes only to a connected owner
                    await self.connected(patient=True)
                payload = await inbox.wait(channel)
            else:
                payload = await self._pulls.pull(channel)
            if payload is None:
                payload = inbox.take(channel)
            if payload is not None:
                return payload

    def keep(self, channel: str, payload: bytes, ttl_ms: int, held: bool) -> None:
        """Buffer a message of ``channel`` for its next ``receive`` (``Inbox.keep``)."""
        self.inbox.keep(channel, payload, ttl_ms, held)

    def _fail_calls(self, error: Exception) -> None:  # pulls, requests, receives of pushes
        self._pulls.end(error=error)
        self.window.fail(error)
        self.unconfirmed.fail(error)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self.inbox.fail(error)

    # -- closing -------------------------------------------------------------

    async def close(self, park: bool = False) -> None:
        """Close; with ``park``, hand an idle connection to the next loop instead."""
        await self.window.settle(self.settings.connect_timeout_s, bool(self.unconfirmed))
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
        busy = self._pending or self.inbox.buffers or self._output or self.unconfirmed
        return not busy and self._pulls.is_quiet
