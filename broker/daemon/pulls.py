"""One connection's pending RECEIVEs of normal channels, and the serving of them.

The router hands a pull back to its connection when a message may wait on its channel
(``Router.wake``); the connection's worker then calls ``Pulls.serve``, which takes one
message per ready pull and answers it with a DELIVER, as long as the pass has room for
more output (``room_for_output``): a worker with many pulls ready writes about
``OUTPUT_HIGH_WATER`` per pass, and serves the rest in the next. For a client that
acknowledges deliveries, storage that can (``LeasesToConsumers``) keeps a normal
channel's message leased until the client's ACK names the DELIVER's lease.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Protocol

from backends import Backend, BackendError, LeasesToConsumers, RenewsLeases
from protocol import Deliver, Frame, ttl_ms

from .context import Context
from .routing import Pull
from .session import Session

__all__ = ["Pulls", "acknowledge_leases"]


class PullShell(Protocol):
    """The connection, as its pulls see it."""

    session: Session | None

    def write(self, frame: Frame) -> None: ...

    def room_for_output(self) -> bool: ...


class Pulls:
    """Pending RECEIVEs by request id, and the ones the router made ready."""

    __slots__ = ("_ctx", "_leases", "_shell", "leased", "pending", "ready")

    def __init__(self, shell: PullShell, ctx: Context) -> None:
        # A proxy: no cycle through us keeps a closed connection's buffers until a GC.
        self._shell: PullShell = weakref.proxy(shell)
        self._ctx = ctx
        #: Storage keeps what it hands a consumer that acknowledges leased until then.
        self._leases = ctx.backend if isinstance(ctx.backend, LeasesToConsumers) else None
        #: Pending RECEIVEs by request id (what CANCEL and close withdraw).
        self.pending: dict[int, Pull] = {}
        #: Pulls the router handed back: a message may wait on their channel.
        self.ready: deque[Pull] = deque()
        #: Leases of DELIVERs written and not yet acknowledged: lease -> (ns, channel).
        #: Storage renews them meanwhile (``RenewsLeases``) until this connection closes.
        self.leased: dict[str, tuple[str, str]] = {}

    async def serve(self) -> None:
        """Answer ready pulls while the pass has room; raise ``BackendError`` with the
        failing pull put back first."""
        backend, router = self._ctx.backend, self._ctx.router
        ready, pending, shell = self.ready, self.pending, self._shell
        session = shell.session
        leases = self._leases if session is not None and session.acks_deliveries else None
        while ready and shell.room_for_output():
            pull = ready.popleft()
            if pending.get(pull.request_id) is not pull:
                router.wake(pull.ns, pull.channel)  # cancelled meanwhile: pass the wake on
                continue
            try:
                if leases is not None and "!" not in pull.channel:
                    taken = await leases.take_leased(pull.ns, pull.channel, 1)
                else:
                    taken = await backend.take(pull.ns, pull.channel, 1, hold=False)
            except BackendError:
                ready.appendleft(pull)
                raise
            if not taken:
                router.requeue(pull)
                continue
            del pending[pull.request_id]
            self._ctx.metrics.delivered["pull"] += 1
            item = taken[0]
            ttl = ttl_ms(item.ttl_s)
            if item.lease:
                self.leased[item.lease] = (pull.ns, pull.channel)
            shell.write(Deliver(pull.request_id, pull.channel, item.payload, ttl, item.lease))

    def withdraw(self) -> None:
        """Take every pending pull out of the router's lines (the connection closes)."""
        router = self._ctx.router
        for pull in self.pending.values():
            router.remove_pull(pull)
        self.pending.clear()
        backend = self._ctx.backend
        if self.leased and isinstance(backend, RenewsLeases):
            for lease, (ns, channel) in self.leased.items():
                backend.abandon(ns, channel, (lease,))
        self.leased.clear()


async def acknowledge_leases(
    backend: Backend,
    ns: str,
    leases: tuple[tuple[str, str], ...],
    leased: dict[str, tuple[str, str]],
) -> None:
    """An ACK's leases: the client received these DELIVERs, so storage ends their
    leases (a lease of another namespace cannot be named: ``ns`` is the client's).
    ``leased``: the connection's DELIVERs not yet acknowledged (``Pulls.leased``)."""
    if not isinstance(backend, LeasesToConsumers):
        return
    by_channel: dict[str, list[str]] = {}
    for channel, lease in leases:
        leased.pop(lease, None)
        by_channel.setdefault(channel, []).append(lease)
    for channel, tokens in by_channel.items():
        if "!" not in channel:
            await backend.acknowledge(ns, channel, tokens)
