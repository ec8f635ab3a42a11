"""One client connection: bytes in and out, and the frames' meaning.

Theory of operation. ``data_received`` only decodes frames into ``inbox``; one
worker task per connection does everything else in order: it answers requests one
after the other (so one writer's sends keep their order), pushes messages of the
client's own channels that the router marked ready, and serves pulls handed to it.
Everything it writes goes into one output buffer, written once per pass, so a burst
of small frames costs one system call. Reading pauses while ``inbox`` is long or the
transport's write buffer is full, so a fast client cannot grow the daemon's memory.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections import deque
from typing import Any

from backends import BackendError, Taken
from protocol import (
    SUPPORTED_VERSIONS,
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
    SendMany,
    Welcome,
    encode_frame,
    is_valid_channel,
    is_valid_group,
)

from .context import Context
from .routing import Pull
from .session import Session, is_valid_client_id, new_client_id
from .version import __version__

__all__ = ["Connection"]

log = logging.getLogger("channels_broker.connection")

#: Frames decoded but not yet handled before reading pauses: enough to keep the
#: worker busy across a read, small enough to bound memory per connection.
INBOX_HIGH_WATER = 512
#: Messages taken from one channel per push pass; more waiting means another pass,
#: so one busy channel cannot starve the others of the same connection.
PUSH_BATCH = 256
#: Seconds a started frame may take to arrive whole before the connection is failed.
PARTIAL_FRAME_TIMEOUT_S = 30.0
#: Seconds before retrying deliveries after a backend error.
DELIVERY_RETRY_S = 0.5
#: Consecutive SENDs answered with one backend call: a layer's whole send window.
SEND_BATCH = 256
#: Output buffered before the worker yields to let the transport write it.
OUTPUT_HIGH_WATER = 256 * 1024


class Connection(asyncio.Protocol):
    """A client connection to the daemon."""

    def __init__(self, context: Context) -> None:
        self.ctx = context
        self.decoder = FrameDecoder(context.config.max_frame_bytes)
        self.handshake = Handshake(Role.DAEMON)
        self.session: Session | None = None
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.inbox: deque[Frame] = deque()
        self.ready_channels: dict[str, None] = {}  # insertion-ordered set
        self.ready_pulls: deque[Pull] = deque()
        self.pulls: dict[int, Pull] = {}
        self.held: dict[str, int] = {}
        self.closing = False
        self.closed = asyncio.get_running_loop().create_future()
        self._output: list[bytes] = []
        self._output_bytes = 0
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._waiter: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._retry_pending = False  # deliveries wait after a backend error
        self._partial_timer: asyncio.TimerHandle | None = None

    # -- transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if not self.ctx.accepting:
            self._fatal(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            return
        self.ctx.connections.add(self)
        self._worker = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        decoder = self.decoder
        decoder.receive_data(data)
        try:
            while (frame := decoder.next_frame()) is not None:
                self.handshake.receive(frame)
                self.inbox.append(frame)
        except ProtocolError as exc:
            log.warning("protocol error from %s: %s (%s)", self.peer, exc, exc.code.name)
            self._fatal(exc.code, str(exc))
            return
        if len(self.inbox) > INBOX_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._watch_partial_frame()
        self._wake()

    def _watch_partial_frame(self) -> None:
        """Give a started frame ``PARTIAL_FRAME_TIMEOUT_S`` to arrive whole.

        A peer that sends half a frame and then nothing would otherwise hold its
        connection (and the bytes) forever without any error being logged.
        """
        if self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None
        if self.decoder.buffered_bytes and not self.closing:
            loop = asyncio.get_running_loop()
            self._partial_timer = loop.call_later(PARTIAL_FRAME_TIMEOUT_S, self._partial_expired)

    def _partial_expired(self) -> None:
        message = f"incomplete frame: {self.decoder.buffered_bytes} bytes, then silence"
        log.warning("protocol error from %s: %s", self.peer, message)
        self._fatal(ErrorCode.MALFORMED_FRAME, message)

    def eof_received(self) -> bool | None:
        if self.decoder.buffered_bytes and not self.closing:
            count = self.decoder.buffered_bytes
            log.warning(
                "protocol error from %s: connection closed inside a frame (%d bytes)",
                self.peer,
                count,
            )
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._partial_timer is not None:
            self._partial_timer.cancel()
        self.ctx.connections.discard(self)
        self._writable.set()
        self._wake()
        if self._worker is None and not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- router callbacks (Endpoint) -----------------------------------------

    def push_later(self, channel: str) -> None:
        self.ready_channels[channel] = None
        self._wake()

    def serve_pull_later(self, pull: Pull) -> None:
        self.ready_pulls.append(pull)
        self._wake()

    def notify_flushed(self) -> None:
        # The backend dropped our held counts along with the messages.
        self.held.clear()
        self._write(Flushed())
        # Out now, before the flusher's OK: a client that sees the OK and then asks
        # another connection must find that connection's buffer already cleared.
        self._flush()

    # -- shutdown ------------------------------------------------------------

    def shut_down(self) -> None:
        """Stop reading; the worker answers what was already read, then closes."""
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self.closing = True
        self._wake()

    def abort(self, reason: str) -> None:
        log.info("closing connection from %s: %s", self.peer, reason)
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    # -- the worker ----------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._work_once()
                if self.closing and not self.inbox:
                    break
                deliveries = (self.ready_channels or self.ready_pulls) and not self._retry_pending
                if not (self.inbox or deliveries):
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
        except Exception:
            log.exception("connection from %s failed", self.peer)
        finally:
            await self._finish()

    async def _work_once(self) -> None:
        await self._writable.wait()
        inbox = self.inbox
        while inbox and self._output_bytes < OUTPUT_HIGH_WATER:
            frame = inbox.popleft()
            if type(frame) is Send and inbox and type(inbox[0]) is Send:
                await self._handle_sends(frame)
            else:
                await self._handle(frame)
        if self._reading_paused and not self.closing and len(inbox) < INBOX_HIGH_WATER // 2:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        try:
            if self.ready_pulls and not self._retry_pending:
                await self._serve_pulls()
            if self.ready_channels and self.session is not None and not self._retry_pending:
                await self._push_ready()
        except BackendError as exc:
            # What was not delivered stays queued (pulls and ready channels are put
            # back before the failing call); try again shortly, not in a busy loop
            # (a backend that is down fails at once, without yielding).
            log.warning("backend error while delivering to %s: %s", self.peer, exc)
            self._retry_pending = True
            asyncio.get_running_loop().call_later(DELIVERY_RETRY_S, self._retry_deliveries)
        self._flush()

    def _retry_deliveries(self) -> None:
        self._retry_pending = False
        self._wake()

    async def _finish(self) -> None:
        self._flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        session = self.session
        if session is not None:
            router = self.ctx.router
            for pull in self.pulls.values():
                router.remove_pull(pull)
            self.pulls.clear()
            router.detach(self, session.ns, session.client_id)
            await self._release_held(session)
        self.ctx.connections.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)

    async def _release_held(self, session: Session) -> None:
        # What we pushed and was not acknowledged stays in the client's buffer, if
        # the client lives; stop counting it so the channel is not full forever.
        held, self.held = self.held, {}
        for channel, count in held.items():
            try:
                await self.ctx.backend.release(session.ns, channel, count)
            except BackendError:
                log.warning("could not release %d held messages of %s", count, channel)

    # -- output --------------------------------------------------------------

    def _write(self, frame: Frame) -> None:
        data = encode_frame(frame)
        self._output.append(data)
        self._output_bytes += len(data)

    def _flush(self) -> None:
        if self._output and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._output))
        self._output.clear()
        self._output_bytes = 0

    def _fatal(self, code: ErrorCode, message: str) -> None:
        """Answer a connection-level error and close (after writing what is buffered)."""
        self.closing = True
        self.inbox.clear()
        self.ctx.metrics.count_error(code)
        self._write(Error(0, int(code), message))
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, request_id: int, code: ErrorCode, message: str) -> None:
        self.ctx.metrics.count_error(code)
        self._write(Error(request_id, int(code), message))

    # -- requests ------------------------------------------------------------

    async def _handle(self, frame: Frame) -> None:
        handler = _HANDLERS.get(type(frame))
        if handler is None:
            # A daemon-to-client frame sent to the daemon.
            log.warning("protocol error from %s: unexpected %s", self.peer, type(frame).__name__)
            self._fatal(ErrorCode.UNKNOWN_FRAME, f"{type(frame).__name__} is not a request")
            return
        started = self.ctx.metrics.now()
        try:
            await handler(self, frame)
        except BackendError as exc:
            log.warning("backend error for %s: %s", type(frame).__name__, exc)
            request_id = getattr(frame, "request_id", 0)
            if request_id:  # an ACK has none; its release is retried on close
                self._fail(request_id, ErrorCode.BACKEND_UNAVAILABLE, str(exc))
        self.ctx.metrics.request_done(frame, started)

    async def _on_hello(self, hello: Hello) -> None:
        if hello.version not in SUPPORTED_VERSIONS:
            log.warning("protocol error from %s: version %d", self.peer, hello.version)
            self._fatal(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {hello.version} unknown")
            return
        token = self.ctx.config.token
        if token and not hmac.compare_digest(hello.token.encode(), token.encode()):
            log.warning("authentication failed from %s", self.peer)
            self._fatal(ErrorCode.AUTH_FAILED, "invalid token")
            return
        if not is_valid_group(hello.prefix):
            self._fatal(ErrorCode.INVALID_NAME, f"invalid prefix {hello.prefix!r}")
            return
        client_id = hello.client_id if is_valid_client_id(hello.client_id) else new_client_id()
        try:
            self.session = session = Session.from_hello(hello, client_id)
        except re.error as exc:
            self._fatal(ErrorCode.MALFORMED_FRAME, f"bad channel_capacity pattern: {exc}")
            return
        previous = self.ctx.router.attach(self, session.ns, client_id)
        if previous is not None and previous is not self:
            previous.abort(f"client {client_id} re-attached from {self.peer}")
        self._write(Welcome(hello.version, client_id, self.ctx.config.max_message_bytes, _SERVER))
        waiting = await self.ctx.backend.channels_with_messages(session.ns, client_id)
        for channel in waiting:
            self.ready_channels[channel] = None

    def _check_channel(self, request_id: int, channel: str) -> bool:
        if is_valid_channel(channel):
            return True
        self._fail(request_id, ErrorCode.INVALID_NAME, f"invalid channel name {channel!r}")
        return False

    def _check_group(self, request_id: int, group: str) -> bool:
        if is_valid_group(group):
            return True
        self._fail(request_id, ErrorCode.INVALID_NAME, f"invalid group name {group!r}")
        return False

    def _check_size(self, request_id: int, payload: bytes) -> bool:
        limit = self.ctx.config.max_message_bytes
        if len(payload) <= limit:
            return True
        message = f"message of {len(payload)} bytes is over the limit of {limit}"
        self._fail(request_id, ErrorCode.MESSAGE_TOO_LARGE, message)
        return False

    async def _on_send(self, frame: Send) -> None:
        rid, channel = frame.request_id, frame.channel
        if not (self._check_channel(rid, channel) and self._check_size(rid, frame.payload)):
            return
        session = self._session()
        accepted = await self.ctx.backend.send(
            session.ns,
            channel,
            frame.payload,
            capacity=session.capacity_of(channel),
            expiry_s=session.expiry_s,
        )
        self.ctx.metrics.count_sent("send", int(accepted), int(not accepted))
        if accepted:
            self._write(Ok(rid))
        else:
            self._fail(rid, ErrorCode.CHANNEL_FULL, f"channel {channel} is full")

    async def _handle_sends(self, first: Send) -> None:
        """Consecutive SENDs as one ``send_many``: one backend round trip, the same replies.

        A layer keeps many sends in flight; a shared backend would otherwise pay a
        round trip for each, one after the other.
        """
        frames = [first]
        while self.inbox and type(self.inbox[0]) is Send and len(frames) < SEND_BATCH:
            frames.append(self.inbox.popleft())  # type: ignore[arg-type]
        started = self.ctx.metrics.now()
        valid = [
            frame
            for frame in frames
            if self._check_channel(frame.request_id, frame.channel)
            and self._check_size(frame.request_id, frame.payload)
        ]
        session = self._session()
        try:
            refused = await self.ctx.backend.send_many(
                session.ns,
                [(frame.channel, frame.payload) for frame in valid],
                capacity_of=session.capacity_of,
                expiry_s=session.expiry_s,
            )
        except BackendError as exc:
            log.warning("backend error for %d Sends: %s", len(valid), exc)
            for frame in valid:
                self._fail(frame.request_id, ErrorCode.BACKEND_UNAVAILABLE, str(exc))
        else:
            full = set(refused)
            self.ctx.metrics.count_sent("send", len(valid) - len(full), len(full))
            for index, frame in enumerate(valid):
                if index in full:
                    self._fail(
                        frame.request_id, ErrorCode.CHANNEL_FULL, f"channel {frame.channel} is full"
                    )
                else:
                    self._write(Ok(frame.request_id))
        for frame in frames:
            self.ctx.metrics.request_done(frame, started)

    async def _on_send_many(self, frame: SendMany) -> None:
        rid = frame.request_id
        for channel, payload in frame.items:
            if not (self._check_channel(rid, channel) and self._check_size(rid, payload)):
                return
        session = self._session()
        rejected = await self.ctx.backend.send_many(
            session.ns, frame.items, capacity_of=session.capacity_of, expiry_s=session.expiry_s
        )
        self.ctx.metrics.count_sent("send_many", len(frame.items) - len(rejected), len(rejected))
        self._write(Ok(rid, len(frame.items) - len(rejected), tuple(rejected)))

    async def _on_receive(self, frame: Receive) -> None:
        rid, channel = frame.request_id, frame.channel
        if not self._check_channel(rid, channel):
            return
        if rid in self.pulls:
            self._fail(rid, ErrorCode.DUPLICATE_REQUEST, f"request {rid} is already pending")
            return
        pull = Pull(self, self._session().ns, channel, rid)
        self.pulls[rid] = pull
        self.ctx.router.add_pull(pull)

    async def _on_cancel(self, frame: Cancel) -> None:
        pull = self.pulls.pop(frame.request_id, None)
        if pull is None:
            return  # already answered: the DELIVER is on its way and the client keeps it
        self.ctx.router.remove_pull(pull)
        self._write(Cancelled(frame.request_id))

    async def _on_ack(self, frame: Ack) -> None:
        session = self._session()
        held = self.held
        for channel, count in frame.counts:
            # Never release more than we hold: a client must not lift its own capacity.
            count = min(count, held.get(channel, 0))
            if count:
                remaining = held[channel] - count
                if remaining:
                    held[channel] = remaining
                else:
                    del held[channel]
                await self.ctx.backend.release(session.ns, channel, count)

    async def _on_group_add(self, frame: GroupAdd) -> None:
        rid = frame.request_id
        if self._check_group(rid, frame.group) and self._check_channel(rid, frame.channel):
            session = self._session()
            await self.ctx.backend.group_add(
                session.ns, frame.group, frame.channel, group_expiry_s=session.group_expiry_s
            )
            self._write(Ok(rid))

    async def _on_group_discard(self, frame: GroupDiscard) -> None:
        rid = frame.request_id
        if self._check_group(rid, frame.group) and self._check_channel(rid, frame.channel):
            await self.ctx.backend.group_discard(self._session().ns, frame.group, frame.channel)
            self._write(Ok(rid))

    async def _on_group_send(self, frame: GroupSend) -> None:
        rid = frame.request_id
        if not (self._check_group(rid, frame.group) and self._check_size(rid, frame.payload)):
            return
        session = self._session()
        result = await self.ctx.backend.group_send(
            session.ns,
            frame.group,
            frame.payload,
            capacity_of=session.capacity_of,
            expiry_s=session.expiry_s,
        )
        self.ctx.metrics.count_group_send(len(result.delivered), result.skipped)
        if result.skipped:
            log.debug("group_send to %s skipped %d full members", frame.group, result.skipped)
        self._write(Ok(rid, result.skipped))

    async def _on_flush(self, frame: Flush) -> None:
        ns = self._session().ns
        await self.ctx.backend.flush(ns)
        self.ctx.router.flushed(ns)
        self._write(Ok(frame.request_id))

    async def _on_ping(self, frame: Ping) -> None:
        self._write(Pong(frame.request_id))

    def _session(self) -> Session:
        # The handshake admits no request before HELLO, and HELLO sets the session
        # or closes the connection.
        assert self.session is not None
        return self.session

    # -- deliveries ----------------------------------------------------------

    async def _serve_pulls(self) -> None:
        backend, router = self.ctx.backend, self.ctx.router
        ready = self.ready_pulls
        while ready:
            pull = ready.popleft()
            if self.pulls.get(pull.request_id) is not pull:
                router.wake(pull.ns, pull.channel)  # cancelled meanwhile: pass the wake on
                continue
            try:
                taken = await backend.take(pull.ns, pull.channel, 1, hold=False)
            except BackendError:
                ready.appendleft(pull)
                raise
            if not taken:
                router.requeue(pull)
                continue
            del self.pulls[pull.request_id]
            self.ctx.metrics.count_delivered("pull", 1)
            item = taken[0]
            self._write(Deliver(pull.request_id, pull.channel, item.payload, _ttl_ms(item.ttl_s)))

    async def _push_ready(self) -> None:
        """Push waiting messages of our channels, one frame per distinct payload.

        A group send stores one payload object in every member's queue; members of
        one connection then share one PUSH frame. A payload joins an existing frame
        only if that keeps each channel's messages in order.
        """
        ns = self._session().ns
        backend = self.ctx.backend
        ready, self.ready_channels = self.ready_channels, {}
        frames: list[tuple[bytes, float, list[str]]] = []
        frame_of_payload: dict[int, int] = {}
        try:
            taken = await backend.take_many(ns, list(ready), PUSH_BATCH, hold=True)
        except BackendError:
            self.ready_channels.update(ready)
            raise
        for channel, items in taken.items():
            del ready[channel]
            self._collect(channel, items, frames, frame_of_payload)
        for payload, ttl_s, channels in frames:
            self._write(Push(tuple(channels), payload, _ttl_ms(ttl_s)))
        if ready:  # not reached: a backend error stopped the batch part-way
            self.ready_channels.update(ready)
            raise BackendError(f"{len(ready)} channels not reached")

    def _collect(
        self,
        channel: str,
        taken: list[Taken],
        frames: list[tuple[bytes, float, list[str]]],
        frame_of_payload: dict[int, int],
    ) -> None:
        """Add one channel's taken messages to the PUSH frames being built, in order."""
        if not taken:
            return
        self.held[channel] = self.held.get(channel, 0) + len(taken)
        self.ctx.metrics.count_delivered("push", len(taken))
        if len(taken) == PUSH_BATCH:
            self.ready_channels[channel] = None  # more may wait: next pass
        last = -1
        for item in taken:
            index = frame_of_payload.get(id(item.payload), -1)
            if index <= last:
                index = len(frames)
                frames.append((item.payload, item.ttl_s, []))
                frame_of_payload[id(item.payload)] = index
            frames[index][2].append(channel)
            last = index


def _ttl_ms(ttl_s: float) -> int:
    return max(0, int(ttl_s * 1000))


_SERVER = f"channels-broker/{__version__}"

_HANDLERS: dict[type[Any], Any] = {
    Hello: Connection._on_hello,
    Send: Connection._on_send,
    SendMany: Connection._on_send_many,
    Receive: Connection._on_receive,
    Cancel: Connection._on_cancel,
    Ack: Connection._on_ack,
    GroupAdd: Connection._on_group_add,
    GroupDiscard: Connection._on_group_discard,
    GroupSend: Connection._on_group_send,
    Flush: Connection._on_flush,
    Ping: Connection._on_ping,
}
