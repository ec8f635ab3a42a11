"""The connection as its request handlers see it (``handlers.Shell``): its client's
state, its output, and what the router asks of it."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from protocol import ErrorCode, Frame

from .guard import Guard
from .routing import Held, Pull
from .session import Session

__all__ = ["Shell"]


class Shell(Protocol):
    """The connection, as its handlers see it: its client's state and its output."""

    peer: str
    session: Session | None
    inbox: deque[Frame]
    #: Pending RECEIVEs by request id.
    pulls: dict[int, Pull]
    held: Held
    #: Own channels with messages to push (an insertion-ordered set).
    ready_channels: dict[str, None]
    #: Its bounds off the message path: pulls, memberships (``guard``).
    guard: Guard

    def write(self, frame: Frame) -> None: ...

    def flush(self) -> None: ...

    def fail(self, request_id: int, code: ErrorCode, message: str) -> None: ...

    def fatal(self, code: ErrorCode, message: str) -> None: ...

    def serve_pull_later(self, pull: Pull) -> None: ...

    def push_later(self, channel: str) -> None: ...

    def can_push(self) -> bool: ...

    def push_now(self, channels: list[str], payload: bytes, ttl_ms: int) -> bool: ...

    def notify_flushed(self) -> None: ...

    def abort(self, reason: str) -> None: ...
