"""What each request frame means: the daemon's side of the channel-layer API.

The connection's worker hands ``Handlers.handle`` each frame, in order; the handlers
answer through the connection's output buffer (``Shell``). Names are checked here
(clients other than our layer may send anything); payloads are never decoded.

Counting is a few increments of ``Metrics``' plain numbers, written here inline: this
runs for every request, and the exporter reads the numbers only when scraped.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from backends import BackendError
from broker.ops.metrics import Histogram
from broker.version import __version__
from protocol import (
    NUMBERED_GROUP_SEND_VERSION,
    Ack,
    Cancel,
    Cancelled,
    Confirm,
    ErrorCode,
    Flush,
    Frame,
    GroupAdd,
    GroupDiscard,
    GroupSend,
    Hello,
    Ok,
    Ping,
    Pong,
    Receive,
    ReturnRoom,
    Send,
    SendMany,
    Welcome,
    is_valid_channel,
    is_valid_group,
    ttl_ms,
)

from .capacity import Refused
from .context import Context
from .direct import give_back_unpushed
from .group_sends import GroupSeqs
from .hello import hello_refusal
from .pulls import acknowledge_leases
from .routing import Pull
from .sends import SEND_BATCH, Sends
from .session import Session, new_client_id
from .shell import Shell

__all__ = ["Handlers", "Shell"]

log = logging.getLogger("channels_broker.connection")

_SERVER = f"channels-broker/{__version__}"


class Handlers:
    """The request handlers of one connection."""

    def __init__(self, shell: Shell, ctx: Context) -> None:
        self.shell = shell
        self.ctx = ctx
        self.sends = Sends(shell, ctx)
        self.group_seqs = GroupSeqs(shell, ctx, self.sends)
        self._keeps_seqs = False  # the client's id is owned: ``ctx.senders`` keeps its seqs

    async def handle(self, frame: Frame) -> None:
        """Answer one request; consecutive SENDs in the inbox are answered together."""
        if type(frame) is Send:
            await self.sends.handle(frame)
            return
        handler = _HANDLERS.get(type(frame))
        if handler is None:  # a daemon-to-client frame sent to the daemon
            name = type(frame).__name__
            log.warning("protocol error from %s: unexpected %s", self.shell.peer, name)
            self.shell.fatal(ErrorCode.UNKNOWN_FRAME, f"{name} is not a request")
            return
        started = perf_counter()
        try:
            await handler(self, frame)
        except BackendError as exc:
            log.warning("backend error for %s: %s", type(frame).__name__, exc)
            request_id = getattr(frame, "request_id", 0)
            if request_id:  # an ACK has none; its release is retried on close
                self.shell.fail(request_id, ErrorCode.BACKEND_UNAVAILABLE, str(exc))
        _observe(self.ctx.metrics.request_by_type[type(frame)], perf_counter() - started)

    async def finish(self) -> None:
        """The connection closed: storage releases its send room; its client's seqs are
        kept for a while, for its next connection (``windows.Senders``)."""
        await self.sends.release_all()
        session = self.shell.session
        if session is not None and self._keeps_seqs:
            self.ctx.senders.detach(session.ns, session.client_id, session.expiry_s)

    def session(self) -> Session:
        # No request comes before HELLO, and HELLO sets the session or closes.
        assert self.shell.session is not None
        return self.shell.session

    # -- the handshake -------------------------------------------------------

    async def _on_hello(self, hello: Hello) -> None:
        shell = self.shell
        refusal = hello_refusal(hello, self.ctx, shell.peer)
        if refusal is not None:
            shell.fatal(*refusal)
            return
        client_id = hello.client_id or new_client_id()
        try:
            shell.session = session = Session.from_hello(hello, client_id, self.ctx.config)
        except Refused as exc:
            log.warning("refused HELLO from %s: %s", shell.peer, exc)
            self.ctx.metrics.count_limit(exc.limit)
            shell.fatal(exc.code, str(exc))
            return
        shell.takes_fanouts = session.takes_fanouts
        previous = self.ctx.router.attach(shell, session.ns, client_id)
        if previous is not None and previous is not shell:
            previous.abort(f"client {client_id} re-attached from {shell.peer}")
            # What it pushed and was not acknowledged goes back to storage first, at
            # the head of its channels: pushed to us before anything newer.
            await asyncio.shield(previous.closed)
        window = self.sends.open(hello)
        version = self.group_seqs.version_for(hello)
        self.group_seqs.attach(session.ns, client_id)
        numbered = window or version >= NUMBERED_GROUP_SEND_VERSION
        # An owned id (proven by its secret) keeps what its numbered SENDs came to.
        self._keeps_seqs = bool(numbered and hello.client_id) and not self.sends.seqs_in_storage
        if self._keeps_seqs:
            self.sends.seqs = self.ctx.senders.attach(session.ns, client_id)
        max_bytes = self.ctx.config.max_message_bytes
        incarnation = self.ctx.incarnation if hello.wants_incarnation else ""
        shell.write(Welcome(version, client_id, max_bytes, _SERVER, window, incarnation))
        await self.take_in_own_channels()

    async def take_in_own_channels(self) -> None:
        """Mark ready the client's own channels storage has messages for (after a
        reconnect, or left out at ``--max-channels``), as many as that bound leaves room."""
        shell, session = self.shell, self.session()
        ready, held = shell.ready_channels, shell.held
        channels = await self.ctx.backend.channels_with_messages(session.ns, session.client_id)
        held.left_out = False
        for channel in channels:
            if channel not in ready and not held.has_room(channel, len(ready)):
                shell.guard.left_out(channel)
                break
            ready[channel] = None

    # -- checks --------------------------------------------------------------

    def _check_channel(self, request_id: int, channel: str) -> bool:
        if is_valid_channel(channel):
            return True
        self.shell.fail(request_id, ErrorCode.INVALID_NAME, f"invalid channel name {channel!r}")
        return False

    def _check_group(self, request_id: int, group: str) -> bool:
        if is_valid_group(group):
            return True
        self.shell.fail(request_id, ErrorCode.INVALID_NAME, f"invalid group name {group!r}")
        return False

    def _check_size(self, request_id: int, payload: bytes) -> bool:
        limit = self.ctx.config.max_message_bytes
        if len(payload) <= limit:
            return True
        message = f"message of {len(payload)} bytes is over the limit of {limit}"
        self.shell.fail(request_id, ErrorCode.MESSAGE_TOO_LARGE, message)
        return False

    # -- receiving -----------------------------------------------------------

    async def _on_receive(self, frame: Receive) -> None:
        rid, channel = frame.request_id, frame.channel
        if not self._check_channel(rid, channel):
            return
        if not self.session().may_pull(channel):
            message = f"{channel} is another client's channel"
            self.shell.fail(rid, ErrorCode.FORBIDDEN, message)
            return
        pulls = self.shell.pulls
        if rid in pulls:
            self.shell.fail(rid, ErrorCode.DUPLICATE_REQUEST, f"request {rid} is already pending")
            return
        if len(pulls) >= self.ctx.config.max_pulls:
            self.shell.guard.over_limit(rid, "max-pulls", f"{len(pulls)} RECEIVEs are pending")
            return
        pull = pulls[rid] = Pull(self.shell, self.session().ns, channel, rid)
        self.ctx.router.add_pull(pull)

    async def _on_cancel(self, frame: Cancel) -> None:
        pull = self.shell.pulls.pop(frame.request_id, None)
        if pull is None:
            return  # already answered: the DELIVER is on its way and the client keeps it
        self.ctx.router.remove_pull(pull)
        self.shell.write(Cancelled(frame.request_id))

    async def _on_ack(self, frame: Ack) -> None:
        ns = self.session().ns
        for channel, count in frame.counts:
            stored, leases = self.shell.held.acknowledge(channel, count)
            if stored or leases:
                await self.ctx.backend.release_taken(ns, channel, stored, leases)
        kept, dropped, held = frame.fanout_kept, frame.fanout_dropped, self.shell.held
        if held.fanouts:  # fan-outs leased in storage (Redis): these ones end
            await held.end_fanouts(self.ctx.backend, ns, kept + dropped)
        if kept or dropped:  # what the layer made of fan-outs
            metrics = self.ctx.metrics
            metrics.accepted["group_send"] += kept
            metrics.delivered["edge"] += kept
            metrics.dropped += dropped
            if dropped:
                log.debug("%s dropped %d group messages for full members", self.shell.peer, dropped)
        if frame.leases:
            await acknowledge_leases(self.ctx.backend, ns, frame.leases, self.shell.leased)

    # -- groups --------------------------------------------------------------

    async def _on_group_add(self, frame: GroupAdd) -> None:
        rid = frame.request_id
        if self._check_group(rid, frame.group) and self._check_channel(rid, frame.channel):
            session, guard = self.session(), self.shell.guard
            if not guard.memberships.has_room(frame.group, frame.channel):
                guard.over_limit(rid, "max-memberships", f"{len(guard.memberships)} memberships")
                return
            # One name object for a channel's every membership (a site's consumer is in
            # several groups), in the backend and in the connection's count alike.
            channel = sys.intern(frame.channel)
            await self.ctx.backend.group_add(
                session.ns, frame.group, channel, group_expiry_s=session.group_expiry_s
            )
            guard.memberships.added(frame.group, channel, session.group_expiry_s)
            self.shell.write(Ok(rid))

    async def _on_group_discard(self, frame: GroupDiscard) -> None:
        rid = frame.request_id
        if self._check_group(rid, frame.group) and self._check_channel(rid, frame.channel):
            await self.ctx.backend.group_discard(self.session().ns, frame.group, frame.channel)
            self.shell.guard.memberships.discarded(frame.group, frame.channel)
            self.shell.write(Ok(rid))

    async def _on_group_send(self, frame: GroupSend) -> None:
        if frame.seq:
            await self._numbered_group_sends(frame)
        elif self._is_valid_group_send(frame):
            await self._deliver(frame)  # a BackendError: ``handle`` answers it

    def _is_valid_group_send(self, frame: GroupSend) -> bool:
        """Check name and size; refuse the frame (a request) or close (a numbered one:
        its sender heard nothing, so the metrics and the log say it, as for a SEND)."""
        rid = frame.request_id
        if rid:
            return self._check_group(rid, frame.group) and self._check_size(rid, frame.payload)
        if not is_valid_group(frame.group):
            code, message = ErrorCode.INVALID_NAME, f"invalid group name {frame.group!r}"
        elif len(frame.payload) > self.ctx.config.max_message_bytes:
            code, message = ErrorCode.MESSAGE_TOO_LARGE, "a numbered GroupSend over the size limit"
        else:
            return True
        log.warning("protocol error from %s: %s", self.shell.peer, message)
        self.shell.fatal(code, message)
        return False

    async def _numbered_group_sends(self, first: GroupSend) -> None:
        """``first`` and the numbered GROUP_SENDs right behind it, in order, then one
        CONFIRM (docs/flow.md; what each seq came to: ``group_sends``)."""
        frames, inbox = [first], self.shell.inbox
        while inbox and type(inbox[0]) is GroupSend and len(frames) < SEND_BATCH:
            if not inbox[0].seq:
                break
            frames.append(inbox.popleft())  # type: ignore[arg-type]
        async with self.group_seqs.lock:  # the client's other connections wait
            await self._numbered_run(frames)

    async def _numbered_run(self, frames: list[GroupSend]) -> None:
        seqs, numbered = self.sends.seqs, self.group_seqs
        stored: list[int] = []  # the run's seqs delivered, for shared storage's record
        for frame in frames:
            seq = frame.seq
            if (seq <= seqs.highest or frame.request_id) and await numbered.was_stored(frame):
                continue
            if not self._is_valid_group_send(frame):
                await numbered.refused(frame)
                if frame.request_id:
                    continue
                break  # the connection closes
            await asyncio.sleep(0)  # others first: earlier pushes out, so this one fans out
            try:
                await self._deliver(frame)
            except BackendError as exc:
                await numbered.failed(frame, exc, stored)
                if frame.request_id:
                    continue
                return  # the connection closes
            # ``Seqs.handled``, written here for a new seq (it runs per message).
            if seq > seqs.highest:
                seqs.highest = seq
            else:
                seqs.handled(seq, stored=True)
            stored.append(seq)
        if numbered.records is not None:
            await numbered.record(stored, stored=True)
        if not self.shell.closing:  # with the room a held CONFIRM of SENDs carries
            held = self.sends.held_confirm
            room = held.take().room if held.seqs else ()  # type: ignore[union-attr]
            self.shell.write(Confirm(seqs.highest, room))

    async def _deliver(self, frame: GroupSend) -> None:
        """The group send itself; an OK for a request (``count``: members full)."""
        session = self.session()
        result = await self.ctx.backend.group_send(
            session.ns,
            frame.group,
            frame.payload,
            capacity_of=session.capacity_of,
            expiry_s=session.expiry_s,
        )
        if frame.request_id:
            self.shell.write(Ok(frame.request_id, result.skipped))
        skipped = result.skipped
        if result.direct:
            leases = list(result.direct_leases)
            skipped += await self._push_direct(list(result.direct), frame.payload, leases)
        metrics = self.ctx.metrics
        reached = len(result.delivered) + len(result.direct) + result.skipped - skipped
        metrics.accepted["group_send"] += reached
        metrics.dropped += skipped
        _observe(metrics.fanout, reached + skipped + result.edge)  # edge: counted at ACK
        if skipped:
            log.debug("group_send to %s skipped %d full members", frame.group, skipped)

    async def _push_direct(self, channels: list[str], payload: bytes, leases: list[str]) -> int:
        """Push to the members nothing was stored for (to wait); return how many were full."""
        # The sender hears first, as writing to many connections takes a while.
        self.shell.flush()
        session, backend = self.session(), self.ctx.backend
        ttl = ttl_ms(session.expiry_s)
        missed = self.ctx.router.direct.push_now(session.ns, channels, payload, ttl, leases)
        if not missed:
            return 0
        try:
            if leases:  # kept leased in storage: back in place for their next connection
                return await give_back_unpushed(backend, session, channels, leases, missed, payload)
            refused = await backend.send_many(
                session.ns,
                [(channel, payload) for channel in missed],
                capacity_of=session.capacity_of,
                expiry_s=session.expiry_s,
            )
        except BackendError as exc:
            log.warning("group message for %d members that left: %s", len(missed), exc)
            return len(missed)
        return len(refused)

    # -- the rest ------------------------------------------------------------

    async def _on_flush(self, frame: Flush) -> None:
        ns = self.session().ns
        await self.ctx.backend.flush(ns)
        self.ctx.router.flushed(ns)
        self.shell.write(Ok(frame.request_id))

    async def _on_ping(self, frame: Ping) -> None:
        self.sends.write_held_confirm()  # a PONG comes after the CONFIRMs of what came before
        self.shell.write(Pong(frame.request_id))


#: Frame type -> its handler: functions, not bound methods kept per instance (they would
#: point back at it, and a closed connection's buffers would wait for the cyclic GC).
_HANDLERS: dict[type[Any], Callable[[Handlers, Any], Awaitable[None]]] = {
    Hello: Handlers._on_hello,
    SendMany: lambda handlers, frame: handlers.sends.handle_many(frame),
    Receive: Handlers._on_receive,
    Cancel: Handlers._on_cancel,
    Ack: Handlers._on_ack,
    GroupAdd: Handlers._on_group_add,
    GroupDiscard: Handlers._on_group_discard,
    GroupSend: Handlers._on_group_send,
    Flush: Handlers._on_flush,
    Ping: Handlers._on_ping,
    ReturnRoom: lambda handlers, frame: handlers.sends.give_back(frame.channel, frame.count),
}


def _observe(histogram: Histogram, value: float) -> None:
    # Histogram.observe, written here: it runs for every request.
    histogram.counts[bisect_left(histogram.bounds, value)] += 1
    histogram.sum += value
