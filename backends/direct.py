"""Direct pushes: an optional capability of a shared backend (PostgreSQL uses it).

The daemon's router offers itself to any backend that ``AcceptsDirectPushes``; the
others keep every message in storage (Redis) or in this process anyway (memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["AcceptsDirectPushes", "DirectPushes"]


class DirectPushes(Protocol):
    """The daemon's side of direct pushes, for a shared backend.

    Storing a message only to take it back out at once costs two round trips to
    storage per recipient. A send or group send may instead leave out of storage the
    channels whose owner is connected to this daemon (``pushable``) and that have
    nothing waiting or held in storage (so their order holds), and push to them: a
    send pushes itself (``push_now``); a group send names them in
    ``GroupSendResult.direct`` for the caller to push once it has answered the sender
    (pushing to many connections takes a while, and the sender need not wait for it).
    Such pushes count against the channel's capacity until acknowledged; storage
    does not see them, so every capacity it checks for a channel is lowered by
    ``held_direct``.
    """

    def held_direct(self, ns: str, channel: str) -> int:
        """Messages pushed directly to ``channel`` (or about to be) and not yet
        acknowledged; the count lapses when the newest of them expires."""

    def pushable(
        self, ns: str, channels: Sequence[str], capacities: list[int], expiry_s: float
    ) -> list[str]:
        """Lower each channel's capacity (in place) by its ``held_direct``; return the
        channels with room left whose owner is connected here and can be written to,
        each with one message reserved: ``push_now`` or ``unreserve`` it."""

    def unreserve(self, ns: str, channels: Sequence[str]) -> None:
        """Give back what ``pushable`` reserved for channels that were stored after all."""

    def push_now(
        self,
        ns: str,
        channels: Sequence[str],
        payload: bytes,
        ttl_ms: int,
        leases: Sequence[str] = (),
    ) -> list[str]:
        """Push ``payload`` to each channel's owner at once; return the channels not
        reached (their owner left since ``pushable`` named them). ``leases``: storage's
        lease on each channel's message (written leased, to outlive this daemon), to
        end when its owner acknowledges it (``Backend.release_taken``), else empty."""


@runtime_checkable
class AcceptsDirectPushes(Protocol):
    """A backend that can leave out of storage what the daemon pushes itself."""

    def set_direct_pushes(self, pushes: DirectPushes) -> None:
        """Say which channels the caller can push to itself; see ``DirectPushes``."""
