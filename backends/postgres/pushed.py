"""Leases on the messages this daemon pushes to its clients' own channels (schema 8).

Theory of operation. A message pushed to a client stays in the table, leased to this
daemon, until the client's layer acknowledges it, so that a daemon killed outright
(SIGKILL, the OOM killer) with pushes in its buffers loses none: their leases lapse,
and the client's next connection (to any daemon) is pushed them again, its layer
dropping a copy of one it handed to ``receive`` already (``HandedIds``).

Every lease of this daemon lies in its own range: a random base with its low 32 bits
0. A message taken from the table for a push (``push_take``) is leased under the base
itself, its id naming it (``<id>.<base>`` in ``Taken.lease``); a direct push, which
was never stored to wait (``DirectPushes``), is written leased in the round trip that
decides on it, under a value of its own above the base chosen before it
(``0.<lease>``: the daemon knows it without the row's id). The daemon counts the
pushes it holds per channel, renews the leases of its range on those channels every
third of the lease (one statement), ends them in the background as ACKs come, many
per statement (``AckWriter``, ``ack_pushed``), and gives back what a closing
connection did not acknowledge (``unlease_pushed``: back in place, in order).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable, Sequence

from backends import BackendError, Taken
from protocol import client_id_of, is_process_specific

from .batching import Ack, AckWriter
from .pool import Database
from .statements import Statements

__all__ = ["PushedLeases", "parse_push_lease"]

log = logging.getLogger("channels_broker.backends.postgres")

#: A daemon's leases: base + 0 .. base + LEASE_RANGE - 1.
LEASE_RANGE = 2**32

#: (namespace, channel)
ChannelKey = tuple[str, str]


class PushedLeases:
    """The leases of this daemon's pushes: their values, count per channel, renewal,
    ends and give-backs."""

    def __init__(self, db: Database, sql: Statements, lease_s: float) -> None:
        self._db = db
        self._sql = sql
        self.lease_s = lease_s
        #: This daemon's range, new at each start: a killed daemon's leases are not ours.
        self.base = (secrets.randbits(31) or 1) * LEASE_RANGE
        self._last = 0
        #: Pushes held leased, by channel (renewed while above 0).
        self._live: dict[ChannelKey, int] = {}
        self.acks = AckWriter(self._write_acks, retry_for_s=lease_s)
        self._renewer: asyncio.Task[None] | None = None

    def new_lease(self) -> int:
        """A lease of our range for one direct push."""
        self._last = self._last % (LEASE_RANGE - 1) + 1
        return self.base + self._last

    def held(self, ns: str, channel: str, count: int) -> None:
        """``count`` more pushes of ``channel`` are leased to us: renew them."""
        key = (ns, channel)
        self._live[key] = self._live.get(key, 0) + count

    def end(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """The client acknowledged the pushes of these leases: delete them (in the
        background, with the other ends due)."""
        ended = _parsed(leases)
        if ended:
            self.acks.add(ns, channel, ended)
            self._unhold(ns, channel, len(ended))

    async def put_back(self, ns: str, channel: str, items: Sequence[Taken]) -> bool:
        """Pushes not acknowledged (``Backend.give_back``) back in their places: leased
        ones unleased; any without a lease written again at the head of its channel
        (unless expired). True if any went back."""
        given = await self.give_back(ns, channel, [item.lease for item in items])
        now = time.monotonic()
        unleased = [(item.payload, item.deadline or now + item.ttl_s) for item in items]
        live = [
            (payload, deadline - now)
            for (payload, deadline), item in zip(unleased, items, strict=True)
            if not item.lease and deadline > now
        ]
        if live:
            payloads, ttls = [payload for payload, _ in live], [ttl for _, ttl in live]
            client = client_id_of(channel) if is_process_specific(channel) else None
            await self._db.execute(self._sql.give_back, ns, channel, client, payloads, ttls)
        return bool(given or live)

    async def give_back(self, ns: str, channel: str, leases: Sequence[str]) -> int:
        """Pushes not acknowledged go back to their places, unleased (one statement);
        return how many leases were ours to give."""
        given = _parsed(leases)
        if given:
            ids, values = [id_ for id_, _ in given], [lease for _, lease in given]
            try:
                await self._db.execute(self._sql.unlease_pushed, ns, channel, ids, values)
            finally:  # not given back (the database away): renewed no more, they lapse
                self._unhold(ns, channel, len(given))
        return len(given)

    def forget(self, ns: str) -> None:
        """The namespace was flushed: nothing of it to renew."""
        for key in [key for key in self._live if key[0] == ns]:
            del self._live[key]

    def _unhold(self, ns: str, channel: str, count: int) -> None:
        key = (ns, channel)
        left = self._live.get(key, 0) - count
        if left > 0:
            self._live[key] = left
        else:
            self._live.pop(key, None)

    async def _write_acks(self, acks: list[Ack]) -> None:
        """``AckWriter``'s one statement: (namespace, channel, id or 0, lease) each."""
        columns = ([a[0] for a in acks], [a[1] for a in acks], [a[2] for a in acks])
        await self._db.execute(self._sql.ack_pushed, *columns, [a[3] for a in acks])

    # -- renewal ---------------------------------------------------------------

    def start(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def close(self) -> None:
        """Stop renewing; write the ends still due (best effort)."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        await self.acks.close()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.renew_once()
            except BackendError as exc:
                log.info("renewing the leases of pushed messages failed: %s", exc)

    async def renew_once(self) -> None:
        """Every lease of our range on the channels we hold pushes of runs a whole
        lease from now: one statement."""
        if not self._live:
            return
        keys = list(self._live)
        spaces, channels = [key[0] for key in keys], [key[1] for key in keys]
        high = self.base + LEASE_RANGE - 1
        await self._db.execute(
            self._sql.renew_pushed, spaces, channels, self.base, high, self.lease_s
        )


def parse_push_lease(lease: str) -> tuple[int, int] | None:
    """(id or 0, lease) of a push's ``Taken.lease``; None if it is not of that form."""
    id_, dot, value = lease.partition(".")
    if not dot or not id_.isdigit() or not value.isdigit():
        return None
    return int(id_), int(value)


def _parsed(leases: Iterable[str]) -> list[tuple[int, int]]:
    return [parsed for lease in leases if (parsed := parse_push_lease(lease))]
