"""Consumers' leases this daemon delivered and renews until they are acknowledged.

A message taken for a consumer that acknowledges deliveries (``take_leased``) stays in
the table, leased, until the consumer's ACK names its lease (``<id>.<token>``). A worker
whose event loop is busy, or whose ACK waits behind others, may take longer than a
lease to answer, and its message must not go to another worker meanwhile (issue 15): so
the daemon renews every such lease it handed out, every third of the lease, in one
statement for all of them (``renew_leases``), until the ACK names it or the DELIVER's
connection closes (``release``, as Redis does: ``backends.RenewsLeases``). Then renewal
stops and the lease lapses within ``lease`` seconds: time for the layer's next
connection, on any daemon, to acknowledge it again; after that any daemon takes the
message again from its place. A daemon killed renews nothing more, likewise.

A renewal matches a row by its id and the take's token, so a lease that lapsed and was
taken again (a new token) is never renewed for the old one; one that lapsed and was not
taken again is simply ours again. A renewal never runs beside this daemon's ``ack``
statement (``AckWriter.exclusive``): each skips the rows the other has locked, and an
acknowledgement that skipped a row being renewed would leave its message leased. An
ACK that reaches another daemon while this one still renews (a connection whose cut
this daemon has not seen yet) may still meet a renewal: that message lapses once this
daemon sees the close, and comes again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from backends import Taken
from backends.renewer import Renewer

from .batching import AckWriter
from .pool import Database
from .statements import Statements

__all__ = ["ConsumerLeases", "parse_consumer_lease"]

log = logging.getLogger("channels_broker.backends.postgres")

#: A consumer's lease as ``take_ahead.consumer_lease`` writes it: two bigints.
_CONSUMER_LEASE = re.compile(r"(\d{1,19})\.(\d{1,19})\Z")
_BIGINT_MAX = 2**63 - 1

#: (namespace, channel, the lease as the consumer names it)
_Key = tuple[str, str, str]


class ConsumerLeases:
    """The consumers' leases this daemon delivered and holds: renewed until released."""

    def __init__(self, db: Database, sql: Statements, lease_s: float, acks: AckWriter) -> None:
        self._db = db
        self._sql = sql
        self._acks = acks
        self._lease_s = lease_s
        #: Leases held -> (message id, take token), as ``renew_leases`` matches rows.
        self._live: dict[_Key, tuple[int, int]] = {}
        self._renewer = Renewer("consumers' leases", lease_s, self.renew_once, log, logging.DEBUG)

    def __len__(self) -> int:
        return len(self._live)

    def hold(self, ns: str, channel: str, taken: Sequence[Taken]) -> None:
        """Renew the leases of ``taken`` (handed to a consumer) until ``release``."""
        for item in taken:
            parsed = parse_consumer_lease(item.lease)
            if parsed is not None:
                self._live[(ns, channel, item.lease)] = parsed
        if self._live:
            self._renewer.start()

    def release(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """Renew these leases no more: acknowledged, or their connection closed."""
        for lease in leases:
            self._live.pop((ns, channel, lease), None)

    async def renew_once(self) -> None:
        """Every lease held runs a whole lease from now: one statement for all."""
        if not self._live:
            return
        keys, rows = list(self._live), list(self._live.values())
        spaces, channels = [key[0] for key in keys], [key[1] for key in keys]
        ids, tokens = [row[0] for row in rows], [row[1] for row in rows]
        async with self._acks.exclusive():  # never beside an ``ack`` (``exclusive``)
            await self._db.execute(
                self._sql.renew_leases, spaces, channels, ids, tokens, self._lease_s
            )

    async def close(self) -> None:
        """Stop renewing (the backend closes): what is held lapses unless acknowledged."""
        await self._renewer.close()


def parse_consumer_lease(lease: str) -> tuple[int, int] | None:
    """(id, lease token) from a consumer's lease; None if it is not of that form."""
    match = _CONSUMER_LEASE.match(lease)
    if match is None:
        return None
    id_, token = int(match[1]), int(match[2])
    return (id_, token) if id_ <= _BIGINT_MAX and token <= _BIGINT_MAX else None
