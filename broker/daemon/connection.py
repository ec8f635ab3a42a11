"""One client connection: bytes in and out, the worker, and deliveries. What each
request means is in ``handlers``; what a channel holds, in ``held``.

Theory of operation. ``data_received`` only decodes frames into ``inbox``; one
worker task per connection does everything else in order: it answers requests one
after the other (so one writer's sends keep their order), pushes messages of the
client's own channels that the router marked ready, and serves pulls handed to it.
Everything it writes goes into one output buffer, written once per pass, so a burst
of small frames costs one system call. Memory is bounded in bytes, input and output
(``guard`` says how; what every frame pays for it is counted here, inline).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from time import perf_counter
from typing import cast

from backends import BackendError
from protocol import (
    HANDSHAKE_FRAMES,
    LARGE_FIELD_BYTES,
    Error,
    ErrorCode,
    Frame,
    FrameEncoder,
    Handshake,
    ProtocolError,
    Push,
    Role,
    encode_into,
    ttl_ms,
)

from .context import Context
from .guard import (
    BATCH_ITEMS,
    FRAME_COST_BYTES,
    ITEM_COST_BYTES,
    PASS_FRAMES,
    PUSH_PASS_MESSAGES,
    WORK_SLICE_S,
    Guard,
    first_of,
    write_apart,
)
from .handlers import Handlers
from .held import Held, Leased
from .pulls import Pulls
from .pushes import PushFrames
from .routing import Pull
from .session import Session

__all__ = ["Connection"]
log = logging.getLogger("channels_broker.connection")

#: Messages taken from one channel per push pass: a busy one cannot starve the others.
PUSH_BATCH = 256
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
        self.takes_fanouts = False  # its layer said so in its HELLO (``backends.fanout``)
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.inbox: deque[Frame] = deque()
        self.ready_channels: dict[str, None] = {}  # insertion-ordered set
        self._pulls = Pulls(self, context)
        self.pulls = self._pulls.pending  # RECEIVEs by request id
        self.leased = self._pulls.leased  # DELIVERs' leases not yet acknowledged
        self.held = Held(context.config.max_channels)
        self.handlers = Handlers(self, context)
        self.guard = Guard(self, context.bounds, context.config)
        self._input_bytes = 0  # read and not yet handled, as FRAME_COST_BYTES says
        # Messages the next push pass may take: the largest ones until sizes are seen.
        self._push_budget = max(1, self.guard.pass_bytes // context.config.max_message_bytes)
        self.closing = self.reading_paused = False
        self.closed = asyncio.get_running_loop().create_future()
        self._output: list[bytes] = []
        self._encoder, self._output_bytes = FrameEncoder(), 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._write_blocked = False  # not _writable: the output check reads it each flush
        self._waiter: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._retry_pending = False  # deliveries wait after a backend error

    # -- transport callbacks -------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods without subclassing it.
        self.transport = transport = cast(asyncio.Transport, base)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if not self.ctx.accepting:
            self.fatal(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        elif self.guard.admit(transport, self.ctx.config.hello_timeout_s):
            self.ctx.connections.add(self)
            self._worker = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.decoder.receive_data(data)
        self._input_bytes += len(data)
        self._decode()
        if self.decoder.buffered_bytes or self.guard.watching_partial:
            self.guard.watch_partial_frame(len(data))
        self._wake()

    def _decode(self) -> None:
        """Decode up to PASS_FRAMES frames into the inbox; pause reading past --max-input-bytes
        or after a whole batch (more may wait: one read of small frames must not hold the loop)."""
        decoder, inbox, handshake = self.decoder, self.inbox, self.handshake
        cost = 0  # beyond their bytes, counted as they were read
        try:
            for _ in range(PASS_FRAMES):
                if (frame := decoder.next_frame()) is None:
                    break
                kind = type(frame)
                if not handshake.is_ready or kind in HANDSHAKE_FRAMES:
                    handshake.receive(frame)
                if kind in BATCH_ITEMS:
                    cost += len(BATCH_ITEMS[kind](frame)) * ITEM_COST_BYTES
                cost += FRAME_COST_BYTES
                inbox.append(frame)
            else:  # a whole batch: more may wait in the decoder
                self._pause_reading()
        except ProtocolError as exc:
            self.guard.protocol_error(exc)  # an ERROR and a close (an HTTP client: in HTTP)
            return
        self._input_bytes += cost
        if self._input_bytes > self.guard.max_input_bytes and not self.reading_paused:
            self.ctx.metrics.limits_hit["max-input-bytes"] += 1  # flow control: counted only
            self._pause_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.guard.eof_received()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.guard.close()
        self.ctx.connections.discard(self)
        self._writable.set()
        self._wake()
        if self._worker is None and not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_blocked = True
        self._writable.clear()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._writable.set()

    def push_later(self, channel: str) -> None:
        ready = self.ready_channels
        if channel not in ready and not self.held.has_room(channel, len(ready)):
            self.guard.left_out(channel)  # its messages wait in storage (--max-channels)
            return
        ready[channel] = None
        self._wake()

    def serve_pull_later(self, pull: Pull) -> None:
        self._pulls.ready.append(pull)
        self._wake()

    def can_push(self, channel: str) -> bool:
        transport = self.transport
        open_ = transport is not None and not transport.is_closing() and not self.closing
        room = self.held.has_room(channel, len(self.ready_channels))
        return open_ and self._writable.is_set() and room

    def push_now(
        self, channels: list[str], payload: bytes, ttl_ms: int, leases: Sequence[str] = ()
    ) -> bool:
        transport = self.transport
        if self.closing or transport is None or transport.is_closing():
            return False
        self.ctx.metrics.delivered["direct"] += len(channels)
        self.held.add_direct(channels, payload, ttl_ms / 1000, leases)
        self.write(Push(tuple(channels), payload, ttl_ms))
        self.flush()  # out now: this connection's worker may be idle
        return True

    def can_fan_out(self, frame_bytes: int) -> bool:
        # In order only if nothing of ours waits in storage to be pushed before it
        # (ready, left out at --max-channels, or after a backend error); and within the
        # output's bounds (a PUSH no larger than a push pass writes): else storage keeps
        # the message, under capacity, and the push passes bring it.
        transport = self.transport
        return (
            self.takes_fanouts
            and frame_bytes <= self.guard.pass_bytes
            and not (self.ready_channels or self.held.left_out or self._retry_pending)
            and not (self.closing or transport is None or transport.is_closing())
            and self._writable.is_set()
            and self._output_bytes < OUTPUT_HIGH_WATER
        )

    def fan_out(
        self, channels: bytes, payload: bytes, ttl_ms: int, capacity: int, lease: Leased = None
    ) -> None:
        output, encoder = self._output, self._encoder
        self._output_bytes += encoder.fanout_into(output, channels, payload, ttl_ms, capacity)
        if lease is not None:  # kept until the layer's ACK covers it (``held``)
            self.held.fanouts.append(lease)
        self._wake()  # the worker's pass writes it out, with whatever else came meanwhile

    def notify_flushed(self) -> None:
        self.guard.flushed()

    def shut_down(self) -> None:
        """Stop reading; the worker answers what was read, then closes (``_work_once``)."""
        self._pause_reading()
        self.closing = True
        self._writable.set()  # a worker waiting for the client to read goes on
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
                deliveries = (self.ready_channels or self._pulls.ready) and not self._retry_pending
                if not (self.inbox or deliveries):
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
                else:  # more to do: the other connections have their turn first
                    await asyncio.sleep(0)
        except Exception:
            log.exception("connection from %s failed", self.peer)
        finally:
            await self._finish()

    async def _work_once(self) -> None:
        if not self.closing:  # a shutdown does not wait for a client that stopped reading
            await self._writable.wait()
        inbox, handle = self.inbox, self.handlers.handle
        deadline = perf_counter() + WORK_SLICE_S
        while inbox and self._output_bytes < OUTPUT_HIGH_WATER and perf_counter() < deadline:
            await handle(inbox.popleft())
        if not inbox:
            self._input_bytes = 0
            if self.reading_paused:
                self._read_on()
        if self.closing and not inbox:
            return  # deliveries stay in storage for the client's next connection
        try:
            if self._pulls.ready and not self._retry_pending:
                await self._pulls.serve()
            if self.ready_channels and self.session is not None and not self._retry_pending:
                await self._push_ready()
            held = self.held  # left out at --max-channels: their messages wait in storage
            if held.left_out and held.should_take_in(len(self.ready_channels)):
                await self.handlers.take_in_own_channels()
        except BackendError as exc:
            # What failed stays queued (put back first); retry soon, not in a busy loop.
            log.warning("backend error while delivering to %s: %s", self.peer, exc)
            self._retry_pending = True
            asyncio.get_running_loop().call_later(DELIVERY_RETRY_S, self._retry_deliveries)
        self.flush()

    def _read_on(self) -> None:
        """The inbox is empty: decode what was read and not yet, or else read again."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._decode()
            if not self.inbox and not self.closing:
                self.reading_paused = False
                transport.resume_reading()

    def _retry_deliveries(self) -> None:
        self._retry_pending = False
        self._wake()

    async def _finish(self) -> None:
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        session = self.session
        if session is not None:
            self._pulls.withdraw()
            # Given back while we own the client id: its next connection here waits (``closed``).
            redeliver = session.acks_deliveries
            await self.held.give_back(self.ctx.backend, session.ns, redeliver=redeliver)
            self.ctx.router.detach(self, session.ns, session.client_id)
            await self.handlers.finish()
        self.ctx.connections.discard(self)
        del self.handlers  # they point back at us: free our buffers now, not at a GC
        if not self.closed.done():
            self.closed.set_result(None)

    def write(self, frame: Frame) -> None:
        # A payload of megabytes goes out as it is (``encode_into``), not copied.
        self._output_bytes += encode_into(self._output, frame)

    def flush(self) -> None:
        transport = self.transport
        if self._output and transport is not None and not transport.is_closing():
            if self.handlers.sends.held_confirm.seqs:  # a CONFIRM held back: due yet?
                self.handlers.sends.confirm_in_write()
            if self._output_bytes < LARGE_FIELD_BYTES:
                transport.write(b"".join(self._output))
            else:  # a large payload may be among them: not copied into a join
                write_apart(transport, self._output)
            if self._write_blocked:  # past its high-water mark (at most the bound)
                self.guard.check_output(transport)
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

    def room_for_output(self) -> bool:
        """True while this pass may write more (``OUTPUT_HIGH_WATER``)."""
        return self._output_bytes < OUTPUT_HIGH_WATER

    # -- deliveries ----------------------------------------------------------

    async def _push_ready(self) -> None:
        """Push waiting messages of our channels, a frame per distinct payload (``pushes``)."""
        ns = self.handlers.session().ns
        budget, ready = self._push_budget, self.ready_channels
        if len(ready) > budget:  # one channel per message of the budget; the rest wait
            ready = first_of(ready, budget)
        else:
            self.ready_channels = {}
        limit = min(PUSH_BATCH, budget // len(ready))
        frames = PushFrames()
        try:
            taken = await self.ctx.backend.take_many(ns, list(ready), limit, hold=True)
        except BackendError:
            self.ready_channels.update(ready)
            raise
        start, pushed = self._output_bytes, 0
        held, metrics = self.held, self.ctx.metrics
        for channel, items in taken.items():
            del ready[channel]
            pushed += frames.collect(held, metrics, channel, items)
            if len(items) == limit:
                self.ready_channels[channel] = None  # more may wait: next pass
        encoder, output = self._encoder, self._output
        for payload, ttl_s, channels in frames.frames:
            self._output_bytes += encoder.push_into(output, channels, payload, ttl_ms(ttl_s))
        written, pass_bytes = self._output_bytes - start, self.guard.pass_bytes
        if pushed and (written > pass_bytes or budget < PUSH_PASS_MESSAGES):
            # The next pass takes what fits pass_bytes at this pass's sizes.
            self._push_budget = min(PUSH_PASS_MESSAGES, max(1, pass_bytes * pushed // written))
        if ready:  # not reached: a backend error stopped the batch part-way
            self.ready_channels.update(ready)
            raise BackendError(f"{len(ready)} channels not reached")
