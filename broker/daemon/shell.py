"""The connection as its request handlers see it (``handlers.Shell``): what the router
sees of it, its client's state, its bounds and its output."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from protocol import ErrorCode, Frame

from .guard import Guard
from .routing import Endpoint, Pull
from .session import Session

__all__ = ["Shell"]


class Shell(Endpoint, Protocol):
    """The connection, as its handlers see it: what the router sees of it (``Endpoint``),
    its client's state and its output."""

    peer: str
    #: The connection is closing: nothing it reads from now on is handled.
    closing: bool
    session: Session | None
    inbox: deque[Frame]
    #: Pending RECEIVEs by request id.
    pulls: dict[int, Pull]
    #: Leases of DELIVERs not yet acknowledged: lease -> (namespace, channel).
    leased: dict[str, tuple[str, str]]
    #: Own channels with messages to push (an insertion-ordered set).
    ready_channels: dict[str, None]
    #: Its bounds off the message path: pulls, memberships (``guard``).
    guard: Guard

    def write(self, frame: Frame) -> None: ...

    def flush(self) -> None: ...

    def fail(self, request_id: int, code: ErrorCode, message: str) -> None: ...

    def fatal(self, code: ErrorCode, message: str) -> None: ...
