"""The values backends hand back: taken messages, group send outcomes, gauges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["BackendStats", "GroupSendResult", "Taken"]


class Taken(NamedTuple):
    """A message taken from a channel: its payload and how long it stays valid.

    A named tuple, not a frozen dataclass: one is built per delivered message, and
    this is about twice as cheap to build.
    """

    payload: bytes
    ttl_s: float
    #: The lease it is held under until acknowledged (``LeasesToConsumers``); "" if none.
    lease: str = ""
    #: When it expires on ``time.monotonic()``'s clock (0.0: unknown, ``ttl_s`` from when
    #: it was taken): what a message pushed and not acknowledged keeps if it is given back
    #: (``Backend.give_back``). A backend that reads a deadline anyway hands it on as is.
    deadline: float = 0.0


@dataclass(frozen=True, slots=True)
class GroupSendResult:
    """Members that got the message, and how many were skipped because full.

    ``delivered`` got it through storage; nothing was stored for the ``direct``
    members: the caller pushes it to them (see ``backends.direct``). ``edge`` members got
    it at the edge (``backends.fanout``): their owners' layers say how many kept it.
    """

    delivered: Sequence[str]
    skipped: int
    direct: Sequence[str] = ()
    edge: int = 0
    #: Storage's lease on each of ``direct`` (``Taken.lease``), in order, if it keeps
    #: them leased until acknowledged (PostgreSQL); else empty.
    direct_leases: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class BackendStats:
    """Cheap-to-compute gauges for metrics and status."""

    channels_waiting: int
    messages_waiting: int
    groups: int
    memberships: int
    expired_total: int
    #: Bytes counted against a bound on this process's memory, and the messages that
    #: bound refused; None and 0 where storage is elsewhere (memory:// only).
    memory_bytes: int | None = None
    memory_refused: int = 0
    #: Messages taken for a worker whose lease lapsed (the take's answer was lost: a
    #: daemon killed, a backend stalled), put back in their queue by this daemon.
    given_back_total: int = 0
