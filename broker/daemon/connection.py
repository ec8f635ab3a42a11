"""One client connection: bytes in and out, the worker, and deliveries.

What each request means is in ``handlers``; what a channel holds, in ``routing.Held``.

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
import logging
from collections import deque

from backends import BackendError, Taken
from protocol import (
    HANDSHAKE_FRAMES,
    Deliver,
    Error,
    ErrorCode,
    Flushed,
    Frame,
    Handshake,
    ProtocolError,
    Push,
    Role,
    encode_frame,
    ttl_ms,
)

from .context import Context
from .handlers import Handlers
from .routing import Held, Pull
from .session import Session

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
#: Output buffered before the worker yields to let the transport write it.
OUTPUT_HIGH_WATER = 256 * 1024


class Connection(asyncio.Protocol):
    """A client connection to the daemon."""

    def __init__(self, context: Context) -> None:
        self.ctx = context
        self.decoder = context.config.frame_decoder()
        self.handshake = Handshake(Role.DAEMON)
        self.session: Session | None = None
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.inbox: deque[Frame] = deque()
        self.ready_channels: dict[str, None] = {}  # insertion-ordered set
        self.ready_pulls: deque[Pull] = deque()
        self.pulls: dict[int, Pull] = {}
        self.held = Held()
        self.handlers = Handlers(self, context)
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
            self.fatal(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            return
        self.ctx.connections.add(self)
        self._worker = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        decoder = self.decoder
        decoder.receive_data(data)
        try:
            handshake = self.handshake
            while (frame := decoder.next_frame()) is not None:
                if not handshake.is_ready or type(frame) in HANDSHAKE_FRAMES:
                    handshake.receive(frame)
                self.inbox.append(frame)
        except ProtocolError as exc:
            log.warning("protocol error from %s: %s (%s)", self.peer, exc, exc.code.name)
            if exc.code is ErrorCode.OVER_LIMIT:
                self.ctx.metrics.count_limit("max-batch")
            self.fatal(exc.code, str(exc))
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
        self.fatal(ErrorCode.MALFORMED_FRAME, message)

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

    def can_push(self) -> bool:
        transport = self.transport
        return (
            not self.closing
            and transport is not None
            and not transport.is_closing()
            and self._writable.is_set()
        )

    def push_now(self, channels: list[str], payload: bytes, ttl_ms: int) -> bool:
        transport = self.transport
        if self.closing or transport is None or transport.is_closing():
            return False
        self.ctx.metrics.delivered["direct"] += len(channels)
        self.write(Push(tuple(channels), payload, ttl_ms))
        # Out now: this connection's worker may be idle, and nothing else would write
        # its buffer (nor can anything take these messages back from storage).
        self.flush()
        return True

    def notify_flushed(self) -> None:
        # The backend dropped our held counts along with the messages.
        self.held.clear()
        self.write(Flushed())
        # Out now, before the flusher's OK: a client that sees the OK and then asks
        # another connection must find that connection's buffer already cleared.
        self.flush()

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
        handle = self.handlers.handle
        while inbox and self._output_bytes < OUTPUT_HIGH_WATER:
            await handle(inbox.popleft())
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
        self.flush()

    def _retry_deliveries(self) -> None:
        self._retry_pending = False
        self._wake()

    async def _finish(self) -> None:
        self.flush()
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
        del self.handlers  # they point back at us: free our buffers now, not at a GC
        if not self.closed.done():
            self.closed.set_result(None)

    async def _release_held(self, session: Session) -> None:
        # What we pushed and was not acknowledged stays in the client's buffer, if
        # the client lives; stop counting it so the channel is not full forever.
        for channel, count in self.held.take_stored().items():
            try:
                await self.ctx.backend.release(session.ns, channel, count)
            except BackendError:
                log.warning("could not release %d held messages of %s", count, channel)

    # -- output --------------------------------------------------------------

    def write(self, frame: Frame) -> None:
        data = encode_frame(frame)
        self._output.append(data)
        self._output_bytes += len(data)

    def flush(self) -> None:
        if self._output and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._output))
        self._output.clear()
        self._output_bytes = 0

    def fatal(self, code: ErrorCode, message: str) -> None:
        """Answer a connection-level error and close (after writing what is buffered)."""
        self.closing = True
        self.inbox.clear()
        self.ctx.metrics.count_error(code)
        self.write(Error(0, int(code), message))
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def fail(self, request_id: int, code: ErrorCode, message: str) -> None:
        """Answer one request with an ERROR."""
        self.ctx.metrics.count_error(code)
        self.write(Error(request_id, int(code), message))

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
            self.ctx.metrics.delivered["pull"] += 1
            item = taken[0]
            self.write(Deliver(pull.request_id, pull.channel, item.payload, ttl_ms(item.ttl_s)))

    async def _push_ready(self) -> None:
        """Push waiting messages of our channels, one frame per distinct payload.

        A group send stores one payload object in every member's queue; members of
        one connection then share one PUSH frame. A payload joins an existing frame
        only if that keeps each channel's messages in order.
        """
        ns = self.handlers.session().ns
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
            self.write(Push(tuple(channels), payload, ttl_ms(ttl_s)))
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
        self.held.add_stored(channel, len(taken))
        self.ctx.metrics.delivered["push"] += len(taken)
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
