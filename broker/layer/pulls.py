"""RECEIVEs of normal channels: in flight, cancelled, and the answers still to come.

A ``receive()`` of a normal channel (or of another loop's process-specific channel)
sends RECEIVE and waits for DELIVER. Cancelling it sends CANCEL; the daemon answers
CANCELLED, or nothing more if its DELIVER was already on the way. Until one of them
comes the pull is an *orphan*: a new pull of that channel first waits for it, or the
late DELIVER would overtake the new pull's message, and a DELIVER that comes is kept in
the channel's local buffer for the next ``receive``. So cancellation loses nothing.

A DELIVER that carries a lease (storage keeps the message until its consumer says it
has it) is acknowledged as it arrives, in an ACK, and said again on the next connection
if it came within ``ACKS_AGAIN_S``: its first ACK may have died with the old one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol

from protocol import MAX_ACK_PAIRS, Ack, Cancel, Deliver, Error, Frame, Receive

from .errors import exception_for

__all__ = ["ACKS_AGAIN_S", "Puller", "Pulls"]

#: Leases acknowledged this recently are acknowledged again on a new connection (a
#: lease lasts 5 s by default), at most the latest ``MAX_ACKS_AGAIN``.
ACKS_AGAIN_S = 10.0
MAX_ACKS_AGAIN = 1024


class Puller(Protocol):
    """What pulls need of their event loop's client."""

    @property
    def is_connected(self) -> bool: ...

    async def connected(self, patient: bool = False) -> Any: ...

    def next_id(self) -> int: ...

    def write(self, frame: Frame) -> None: ...

    def keep(self, channel: str, payload: bytes, ttl_ms: int, held: bool) -> None: ...


class Pulls:
    """The pulls of one loop's client."""

    def __init__(self, client: Puller, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        #: Request id -> its future; it may be cancelled already (see ``answer``).
        self._futures: dict[int, asyncio.Future[Frame | None]] = {}
        #: Cancelled pulls awaiting their last answer: (channel, set when it comes).
        self._orphans: dict[int, tuple[str, asyncio.Future[None]]] = {}
        #: (when, channel, lease) of the latest DELIVERs acknowledged (``acks_again``).
        self._acked: deque[tuple[float, str, str]] = deque(maxlen=MAX_ACKS_AGAIN)

    @property
    def is_quiet(self) -> bool:
        """Nothing in flight and nothing still to come."""
        return not (self._futures or self._orphans)

    async def pull(self, channel: str) -> bytes | None:
        """One RECEIVE; None if the connection dropped or the message expired on its way
        (the caller looks at its buffer and tries again). Waits for a daemon that is away."""
        await self._client.connected(patient=True)  # a receive outlives an outage
        unresolved = [done for ch, done in self._orphans.values() if ch == channel]
        if unresolved:
            # Shielded: our cancellation must not cancel the shared future.
            await asyncio.shield(asyncio.gather(*unresolved))
            return None
        request_id = self._client.next_id()
        future: asyncio.Future[Frame | None] = self._loop.create_future()
        self._futures[request_id] = future
        self._client.write(Receive(request_id, channel))
        try:
            reply = await future
        except asyncio.CancelledError:
            self._cancel(request_id, channel, future)
            raise
        if type(reply) is Deliver:
            return reply.payload if reply.ttl_ms > 0 else None
        if type(reply) is Error:
            raise exception_for(reply)
        return None

    def _cancel(self, request_id: int, channel: str, future: asyncio.Future[Any]) -> None:
        in_flight = self._futures.pop(request_id, None) is not None
        if not in_flight and future.cancelled():
            return  # answered meanwhile (see ``answer``), or the connection was lost
        if future.done() and not future.cancelled():
            reply = future.result()
            if type(reply) is Deliver:  # it arrived as we were cancelled: keep it
                self._client.keep(channel, reply.payload, reply.ttl_ms, held=False)
        elif self._client.is_connected:
            self._orphans[request_id] = (channel, self._loop.create_future())
            self._client.write(Cancel(request_id))

    def answer(self, frame: Frame) -> bool:
        """Take the answer to a pull (True), or leave a frame that answers none (False)."""
        if type(frame) is Deliver and frame.lease:
            # The message is ours now, whatever becomes of its pull: storage may end its
            # lease. An ACK may be lost with its connection (or its daemon): the next
            # connection says it again (``acks_again``).
            self._client.write(Ack((), leases=((frame.channel, frame.lease),)))
            self._acked.append((self._loop.time(), frame.channel, frame.lease))
        request_id: int = getattr(frame, "request_id", 0)
        future = self._futures.pop(request_id, None)
        if future is not None:
            if not future.done():
                future.set_result(frame)
            elif type(frame) is Deliver:
                # The pull was cancelled in this very loop pass and its task has not
                # run ``_cancel`` yet: the answer is final, so keep what it delivered.
                self._client.keep(frame.channel, frame.payload, frame.ttl_ms, held=False)
            return True
        orphan = self._orphans.pop(request_id, None)
        if orphan is None:
            return False
        channel, resolved = orphan
        if type(frame) is Deliver:
            self._client.keep(channel, frame.payload, frame.ttl_ms, held=False)
        resolved.set_result(None)
        return True

    def acks_again(self) -> list[Frame]:
        """A new connection: the leases acknowledged in the last ``ACKS_AGAIN_S``, again
        (ending a lease twice is harmless; one the last daemon never ended would lapse,
        and its message come again, perhaps to another process)."""
        since = self._loop.time() - ACKS_AGAIN_S
        leases = tuple((channel, lease) for at, channel, lease in self._acked if at >= since)
        return [
            Ack((), leases=leases[at : at + MAX_ACK_PAIRS])
            for at in range(0, len(leases), MAX_ACK_PAIRS)
        ]

    def end(self, answer: Frame | None = None, error: Exception | None = None) -> None:
        """The connection is gone: pulls in flight get ``answer`` (None: pull again) or
        ``error``; orphans will hear nothing more."""
        for future in self._futures.values():
            if not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(answer)
        self._futures.clear()
        for _, resolved in self._orphans.values():
            resolved.set_result(None)
        self._orphans.clear()
