"""Fan-outs to owners attached to another daemon: the owner's daemon's side.

Theory of operation. This daemon marks each client attached to it that takes fan-outs
(``attach``, before it looks for what waits for the client): a key in the client's slot
naming this daemon and the mark's version, for a lease, renewed every third of one
while the client stays (``renew_once``) and removed when it leaves (``detach``). A group
send on any daemon of this release appends one record (the payload once and the
client's member list) to a marked client's fan-out list instead of storing the message
for each member, and publishes one wake-up ``*`` on the client's wake-up channel
(``edge_scripts.FANOUT_LEASE``). That wake-up (or the renewal, which sees the list's
length, in case one was missed) makes this daemon take the list's records, leased to
itself, in order (``take_soon``), and push each as one PUSH (``EdgeFanOuts.deliver``):
from then on they are this daemon's fan-outs, acknowledged, renewed and given back as
those sent here. A client that leaves takes its mark away, and what its list still
holds is stored for each member (``UNMARK_CLIENT``). A daemon killed leaves its marks
to lapse within a lease (until then records are still appended: the client's next
connection takes them, or stores them per member once their lease lapses, as for any
lapsed fan-out). A daemon of an earlier release marks nothing: group sends store per
member for its clients, as before.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from backends.renewer import Renewer

from .commands import Commands
from .edge import EdgeFanOuts
from .keys import KEEP_MARGIN_MS, Keys
from .pushed import EXPAND_MOST_MEMBERS
from .remote_scripts import MARK_CLIENTS, REMOTE_VERSION, TAKE_FANOUTS, UNMARK_CLIENT
from .wakeups import Wakeups

__all__ = ["RemoteFanOuts"]

log = logging.getLogger("channels_broker.backends.redis")

#: Records one take pops at most: one PUSH each, so a few dozen is a pass's worth.
TAKE_MOST_RECORDS = 64
#: Marks one renewing script renews at most.
RENEW_MOST_CLIENTS = 512


class RemoteFanOuts:
    """The marks of the clients attached here, and the records taken from their lists."""

    def __init__(self, keys: Keys, commands: Commands, edge: EdgeFanOuts, wakeups: Wakeups) -> None:
        self._keys = keys
        self._commands = commands
        self._edge = edge
        lease_s = edge.lease_ms / 1000
        self._lease_ms = edge.lease_ms
        self._mark = f"{REMOTE_VERSION} {edge.origin}"
        #: (ns, client) marked by us, while attached here.
        self._marked: set[tuple[str, str]] = set()
        #: (ns, client) -> whether to take again once the take in flight is done.
        self._taking: dict[tuple[str, str], bool] = {}
        self._renewer = Renewer("the marks of attached clients", lease_s, self.renew_once, log)
        #: Called with (ns, client id) when a fan-out of the client's lapsed: look at
        #: its channels (``OWN_WAITING`` stores the record per member).
        self.on_lapsed: Callable[[str, str], None] = wakeups.rewake_client
        wakeups.on_fanouts = self.take_soon  # the wake-up ``*``, or a look after a gap

    def start(self) -> None:
        self._renewer.start()

    def stop(self) -> None:
        self._renewer.stop()

    async def attach(self, ns: str, client: str) -> None:
        """Mark the client attached here if it takes fan-outs, then take its list. Called
        before the client's channels are looked at: a message stored per member before
        the mark is found there and pushed before any record appended after it."""
        owner = self._edge.owners.get((ns, client))
        if owner is None or not owner.takes_fanouts or (ns, client) in self._marked:
            return
        self._marked.add((ns, client))
        keys = self._mark_keys(ns, client)
        await self._commands.run(MARK_CLIENTS, keys, [*self._mark_args(), 1])
        self.take_soon(ns, client)

    def detach(self, ns: str, client: str) -> None:
        """The client left: unmark it, and store what its list holds per member."""
        if (ns, client) in self._marked:
            self._marked.discard((ns, client))
            self._commands.spawn(self._unmark(ns, client))

    async def _unmark(self, ns: str, client: str) -> None:
        mark, fq, _ = self._keys_of(ns, client)
        base = self._keys.base(f"{ns}!{client}")
        args = [self._mark, base, self._commands.require().publish_command, KEEP_MARGIN_MS]
        args.append(EXPAND_MOST_MEMBERS)
        keys = [mark, fq, self._keys.index(ns, client)]
        while True:  # a slice of members a call
            reply = await self._commands.run(UNMARK_CLIENT, keys, args)
            for name in reply[1:]:
                self._edge.wake(ns, name.decode())
            if not int(reply[0]):
                return

    def take_soon(self, ns: str, client: str) -> None:
        """Take the records of a client's list (one take at a time per client)."""
        key = (ns, client)
        if key not in self._marked:
            return  # a lingering subscription: the client is not attached here
        if key in self._taking:
            self._taking[key] = True
            return
        self._taking[key] = False
        self._commands.spawn(self._take(ns, client))

    async def _take(self, ns: str, client: str) -> None:
        key = (ns, client)
        keys = self._keys_of(ns, client)
        record_keys = [*self._edge.record_keys(ns, client), keys[1]]
        args = [self._lease_ms, KEEP_MARGIN_MS, TAKE_MOST_RECORDS]
        try:
            while True:
                reply = await self._commands.run(TAKE_FANOUTS, record_keys, args)
                records = [
                    (reply[i].decode(), reply[i + 1], reply[i + 2]) for i in range(2, len(reply), 3)
                ]
                if records:
                    await self._edge.deliver(ns, client, int(reply[0]), records)
                if not int(reply[1]) and not self._taking.get(key):
                    return
                self._taking[key] = False
        finally:
            self._taking.pop(key, None)

    async def renew_once(self) -> None:
        """Renew our marks (one script per slot and ``RENEW_MOST_CLIENTS``), take the
        lists that hold records (a wake-up may have been missed), and look at the
        channels of clients with a lapsed fan-out (a take's reply may have been lost:
        nothing renews it; or a dead daemon's, while the client stayed here)."""
        if not self._marked:
            return
        is_cluster = self._commands.require().is_cluster
        by_slot: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for ns, client in self._marked:
            mark = self._keys_of(ns, client)[0]
            by_slot[Keys.slot(mark) if is_cluster else 0].append((ns, client))
        for clients in by_slot.values():
            for at in range(0, len(clients), RENEW_MOST_CLIENTS):
                some = clients[at : at + RENEW_MOST_CLIENTS]
                keys: list[Any] = [key for c in some for key in self._mark_keys(*c)]
                reply = await self._commands.run(MARK_CLIENTS, keys, [*self._mark_args(), 0])
                for i, (ns, client) in enumerate(some):
                    if int(reply[2 * i]):
                        self.take_soon(ns, client)
                    if int(reply[2 * i + 1]):
                        self.on_lapsed(ns, client)

    def _mark_args(self) -> list[Any]:
        return [self._mark, self._lease_ms]

    def _mark_keys(self, ns: str, client: str) -> list[str]:
        """``MARK_CLIENTS``' keys of a client: mark, fan-out list, fan-outs' leases."""
        mark, fq, base = self._keys_of(ns, client)
        return [mark, fq, f"{base}fd"]

    def _keys_of(self, ns: str, client: str) -> tuple[str, str, str]:
        """A client's mark, fan-out list and key base."""
        base = self._keys.base(f"{ns}!{client}")
        return f"{base}a", f"{base}fq", base
