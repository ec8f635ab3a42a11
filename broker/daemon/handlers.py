"""What each request frame means: the daemon's side of the channel-layer API.

``RequestHandlers`` is mixed into ``Connection``: the connection's worker calls
``_handle`` for each frame, in order, and the handlers answer through the
connection's output buffer. Names are checked here (clients other than our layer
may send anything); payloads are never decoded.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections import deque
from typing import TYPE_CHECKING, Any

from backends import BackendError
from broker.version import __version__
from protocol import (
    SUPPORTED_VERSIONS,
    Ack,
    Cancel,
    Cancelled,
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
    Send,
    SendMany,
    Welcome,
    is_valid_channel,
    is_valid_group,
)

from .context import Context
from .routing import Pull
from .session import Session, is_valid_client_id, new_client_id

__all__ = ["RequestHandlers", "uncount"]

log = logging.getLogger("channels_broker.connection")

#: Consecutive SENDs answered with one backend call: a layer's whole send window.
SEND_BATCH = 256

_SERVER = f"channels-broker/{__version__}"


class RequestHandlers:
    """Request handlers of a ``Connection``; the state they use is the connection's."""

    ctx: Context
    session: Session | None
    peer: str
    inbox: deque[Frame]
    pulls: dict[int, Pull]
    held: dict[str, int]
    ready_channels: dict[str, None]

    if TYPE_CHECKING:  # provided by Connection

        def _write(self, frame: Frame) -> None: ...
        def _flush(self) -> None: ...
        def _fail(self, request_id: int, code: ErrorCode, message: str) -> None: ...
        def _fatal(self, code: ErrorCode, message: str) -> None: ...
        def push_later(self, channel: str) -> None: ...
        def serve_pull_later(self, pull: Pull) -> None: ...
        def notify_flushed(self) -> None: ...
        def can_push(self) -> bool: ...
        def direct_held(self, channel: str) -> int: ...
        def reserve_direct(self, channel: str, expiry_s: float) -> None: ...
        def unreserve_direct(self, channel: str, count: int = 1) -> None: ...
        def push_now(self, channels: list[str], payload: bytes, ttl_ms: int) -> bool: ...
        def abort(self, reason: str) -> None: ...

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
            # Stored ones first: other daemons see only those.
            stored = uncount(held, channel, count)
            if count > stored:
                self.unreserve_direct(channel, count - stored)
            if stored:
                await self.ctx.backend.release(session.ns, channel, stored)

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
        self._write(Ok(rid, result.skipped))
        skipped = result.skipped
        if result.direct:
            # Members to push to ourselves (nothing stored for them): the sender hears
            # first, as writing to many connections takes a while.
            self._flush()
            ttl_ms = int(session.expiry_s * 1000)
            missed = self.ctx.router.push_now(session.ns, result.direct, frame.payload, ttl_ms)
            if missed:
                skipped += await self._store_for(missed, frame.payload)
        reached = len(result.delivered) + len(result.direct) + result.skipped - skipped
        self.ctx.metrics.count_group_send(reached, skipped)
        if skipped:
            log.debug("group_send to %s skipped %d full members", frame.group, skipped)

    async def _store_for(self, channels: list[str], payload: bytes) -> int:
        """Store a group message for members whose owner left before the push; return
        how many were full."""
        session = self._session()
        try:
            refused = await self.ctx.backend.send_many(
                session.ns,
                [(channel, payload) for channel in channels],
                capacity_of=session.capacity_of,
                expiry_s=session.expiry_s,
            )
        except BackendError as exc:
            log.warning("lost a group message for %d members that left: %s", len(channels), exc)
            return len(channels)
        return len(refused)

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


def uncount(counts: dict[str, int], channel: str, count: int) -> int:
    """Take up to ``count`` off ``counts[channel]``; return how many were taken off."""
    have = counts.get(channel, 0)
    count = min(count, have)
    if count:
        if have > count:
            counts[channel] = have - count
        else:
            del counts[channel]
    return max(count, 0)


_HANDLERS: dict[type[Any], Any] = {
    Hello: RequestHandlers._on_hello,
    Send: RequestHandlers._on_send,
    SendMany: RequestHandlers._on_send_many,
    Receive: RequestHandlers._on_receive,
    Cancel: RequestHandlers._on_cancel,
    Ack: RequestHandlers._on_ack,
    GroupAdd: RequestHandlers._on_group_add,
    GroupDiscard: RequestHandlers._on_group_discard,
    GroupSend: RequestHandlers._on_group_send,
    Flush: RequestHandlers._on_flush,
    Ping: RequestHandlers._on_ping,
}
