"""Which connection gets which message.

Theory of operation. The backend calls ``Router.wake(ns, channel)`` each time a
message may be waiting on a channel. Two kinds of channel:

* Process-specific (``prefix.client!local``): owned by the one connection whose
  session holds that client id. The owner is told to push the channel's messages;
  with no owner (a client reconnecting) they wait in the backend, and the owner
  collects them when it attaches again. Without an owner such a channel can also
  be pulled like a normal one by another event loop of the same process, whose id
  is of the same family (``protocol.identity``; handlers refuse anyone else's RECEIVE).
* Normal (no ``!``): a work queue. Connections register pulls (a RECEIVE each) in
  one FIFO line per channel; each wake hands the channel to the first pull in line
  (round-robin across workers). A served pull that finds the queue empty (another
  daemon or pull took the message) goes back to the front of the line, and one whose
  request was cancelled meanwhile passes the wake on, so no wake is lost.

The router never touches the backend's data itself; connections do the ``take``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from backends import AcceptsDirectPushes, Backend, FanOutLease, FansOutAtTheEdge
from protocol import client_id_of

from .direct import DirectPusher
from .held import Held

__all__ = ["Endpoint", "Pull", "Router"]


class Endpoint(Protocol):
    """What the router needs of a connection."""

    #: What the connection's own channels hold of their capacity (``Held``).
    held: Held
    #: True if its layer takes fan-out PUSHes (``backends.fanout``).
    takes_fanouts: bool
    #: Done once the connection closed and gave back what it pushed unacknowledged.
    closed: asyncio.Future[None]

    def push_later(self, channel: str) -> None:
        """Push the waiting messages of one of this connection's own channels."""

    def serve_pull_later(self, pull: Pull) -> None:
        """Try to answer a RECEIVE: a message may be waiting on its channel."""

    def can_push(self, channel: str) -> bool:
        """True if messages for ``channel``, one of ours, can be pushed now (``push_now``)."""

    def push_now(
        self, channels: list[str], payload: bytes, ttl_ms: int, leases: Sequence[str] = ()
    ) -> bool:
        """Push one message to several of our channels at once (``leases``: storage's
        lease on each, if it keeps one); False if closing."""

    def can_fan_out(self, frame_bytes: int) -> bool:
        """True if a group fan-out of about ``frame_bytes`` can go to this connection
        now, in order (``backends.fanout``)."""

    def fan_out(
        self,
        channels: bytes,
        payload: bytes,
        ttl_ms: int,
        capacity: int,
        lease: FanOutLease | None = None,
    ) -> None:
        """Push a group message to these of our channels (encoded), under ``capacity``;
        keep its ``lease`` until acknowledged."""

    def notify_flushed(self) -> None:
        """The connection's namespace was flushed."""

    def abort(self, reason: str) -> None:
        """Close the connection at once (its client id was taken over)."""


@dataclass(slots=True, eq=False)
class Pull:
    """One pending RECEIVE on a normal channel."""

    endpoint: Endpoint
    ns: str
    channel: str
    request_id: int


class Router:
    """Owners of client ids and lines of pulls, for one daemon."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._owners: dict[tuple[str, str], Endpoint] = {}
        self._lines: dict[tuple[str, str], deque[Pull]] = {}
        self._members: dict[str, set[Endpoint]] = {}
        backend.set_wakeup(self.wake)
        #: Pushes a send may make without storing (only if the backend accepts them).
        self.direct = DirectPusher(self.owner_of)
        if isinstance(backend, AcceptsDirectPushes):
            backend.set_direct_pushes(self.direct)
        if isinstance(backend, FansOutAtTheEdge):
            backend.set_edge_owners(self._owners)

    @property
    def connection_count(self) -> int:
        return sum(len(endpoints) for endpoints in self._members.values())

    def attach(self, endpoint: Endpoint, ns: str, client_id: str) -> Endpoint | None:
        """Make ``endpoint`` the owner of ``client_id``; return the previous owner, if any."""
        previous = self._owners.get((ns, client_id))
        self._owners[(ns, client_id)] = endpoint
        self._members.setdefault(ns, set()).add(endpoint)
        if previous is None:
            self._backend.watch(ns, client_id)
        return previous

    def detach(self, endpoint: Endpoint, ns: str, client_id: str) -> None:
        """Forget ``endpoint``: its ownership (unless taken over) and its pulls."""
        if self._owners.get((ns, client_id)) is endpoint:
            del self._owners[(ns, client_id)]
            self._backend.unwatch(ns, client_id)
        members = self._members.get(ns)
        if members is not None:
            members.discard(endpoint)
            if not members:
                del self._members[ns]

    def wake(self, ns: str, channel: str) -> None:
        """Backend callback: messages may be waiting on ``channel``."""
        if "!" in channel:
            owner = self._owners.get((ns, client_id_of(channel)))
            if owner is not None:
                owner.push_later(channel)
                return
            # No owner here: another event loop of the same process may be pulling it.
        line = self._lines.get((ns, channel))
        if line:
            pull = line.popleft()
            self._forget_line_if_empty(ns, channel, line)
            pull.endpoint.serve_pull_later(pull)

    def owner_of(self, ns: str, channel: str) -> Endpoint | None:
        """The connection that owns a process-specific channel here, if any."""
        return self._owners.get((ns, client_id_of(channel)))

    def add_pull(self, pull: Pull) -> None:
        """Queue a RECEIVE and try it at once (a message may already wait)."""
        self._line_of(pull).append(pull)
        self.wake(pull.ns, pull.channel)

    def requeue(self, pull: Pull) -> None:
        """Put back a served pull that found nothing, first in line (it waited longest)."""
        self._line_of(pull).appendleft(pull)

    def _line_of(self, pull: Pull) -> deque[Pull]:
        """The line of ``pull``'s channel, made (and watched) if it is new."""
        key = (pull.ns, pull.channel)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = deque()
            self._backend.watch(pull.ns, pull.channel)
        return line

    def remove_pull(self, pull: Pull) -> None:
        """Withdraw a pull (cancelled, or its connection closed); a no-op if not queued."""
        line = self._lines.get((pull.ns, pull.channel))
        if line is None:
            return
        try:
            line.remove(pull)
        except ValueError:
            return
        self._forget_line_if_empty(pull.ns, pull.channel, line)

    def flushed(self, ns: str) -> None:
        """Tell every connection of ``ns`` that its buffered messages are gone."""
        for endpoint in list(self._members.get(ns, ())):
            endpoint.notify_flushed()

    def _forget_line_if_empty(self, ns: str, channel: str, line: deque[Pull]) -> None:
        if not line:
            del self._lines[(ns, channel)]
            self._backend.unwatch(ns, channel)
