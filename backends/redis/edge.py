"""Group fan-out at the edge on Redis: work per owning client, not per member.

Theory of operation. A group send with one capacity for all members reads the group's
live members (``ZSCAN`` pages, as for any big group) and groups them by the client id
that owns them (``grouped``: kept per group while the member list Redis returns is the
same, so a steady room costs no decoding). For each owner attached to this daemon whose
connection can take a fan-out now, in order (``EdgeOwner.can_fan_out``), one
``FANOUT_LEASE`` (one per slot, for all such owners) keeps one record in the owner's
slot: the payload once and the member list, leased (``edge_scripts``). Then the daemon
writes one PUSH per owner; the layer applies each member's capacity in its own buffer.
The connection keeps the lease (``FanOutLease``) until the layer's ACK counts cover the
fan-out (``end``), and hands it back if it closes first (``give_back``: the record is
stored for each member, under capacity). This daemon renews the leases it holds every
third of the lease; a daemon killed with fan-outs in flight renews nothing, and the
owner's next connection stores them once they lapse (``OWN_WAITING``), so none is lost;
its layer drops a copy of one it got (by message id). An owner attached to another
daemon that marked it gets the same record, appended to its list in the same script,
for that daemon to take and push (``remote``, ``deliver``). Members of other owners
(away, on a daemon of an earlier release, or unable to take it in order now) are stored
per member, in bounded slices, as before (``sends``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from backends import EdgeOwner, EdgeOwners, FanOutLease
from backends.renewer import Renewer
from protocol import client_id_of, encode_channels, ttl_ms

from .commands import Commands
from .edge_scripts import END_FANOUTS, FANOUT_LEASE, GIVE_BACK_FANOUTS, GROUP_SAME, RENEW_FANOUTS
from .keys import KEEP_MARGIN_MS, Keys
from .pushed import EXPAND_MOST_MEMBERS, PushedLeases
from .takes import DEADLINE_DIGITS

__all__ = ["Check", "EdgeFanOuts", "Owned"]

log = logging.getLogger("channels_broker.backends.redis")

#: One owner's members of a group: their names, the list a PUSH carries (encoded once),
#: and the list its record keeps (space-separated).
Owned = tuple[list[str], bytes, str]
#: Groups whose grouped members are kept (the oldest go past it).
KEPT_GROUPS = 1024
#: Member lists of records taken from owners' lists kept encoded (a steady room sends
#: the same list each time; a few rooms' worth, a list of 10,000 members is ~200 KB).
KEPT_LISTS = 64
#: Members kept are read again after this long even if the group's version says they
#: hold: a daemon of an earlier release adds members without changing the version, so
#: while both run (a rolling upgrade) its additions reach these sends within this.
KEEP_GROUPED_S = 1.0


#: What says whether members read before still hold: the group's version key, the
#: version they were read at, and the soonest deadline among them (ms, Redis time).
Check = tuple[str, bytes, int]


class Kept(NamedTuple):
    """A group's live members as read last, and what says whether they still hold."""

    names: list[bytes]
    owned: dict[str | None, Owned]
    version: bytes | None
    soonest: int
    read_at: float


class EdgeFanOuts:
    """The fan-outs of one daemon: owners it can reach, records leased, renewal."""

    def __init__(
        self,
        keys: Keys,
        commands: Commands,
        lease_s: float,
        wake: Callable[[str, str], None],
        origin: str,
    ) -> None:
        self._keys = keys
        self.origin = origin
        self._commands = commands
        self.lease_ms = int(lease_s * 1000)
        #: Tells the router messages may wait on a channel.
        self.wake = wake
        self.owners: EdgeOwners = {}
        #: (ns, group) -> the member names Redis returned last, them by owner, the group's
        #: version they were read at, the soonest deadline among them (ms), and when they
        #: were read (``time.monotonic``).
        self._grouped: dict[tuple[str, str], Kept] = {}
        #: (ns, owner) -> tokens of the records this daemon holds leased.
        self._live: dict[tuple[str, str], set[str]] = {}
        #: Record keys (hash, zset) -> tokens acknowledged this pass, not yet ended.
        self._ends: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
        self._renewer = Renewer("the leases of fan-outs", lease_s, self.renew_once, log)
        #: Member lists taken from records (``deliver``) -> (encoded, count): a steady
        #: room sends the same list every time.
        self._listed: dict[bytes, tuple[bytes, int]] = {}

    def kept(self, ns: str, group: str) -> tuple[bytes, int, dict[str | None, Owned]] | None:
        """A group's members by owner as read last (``grouped``), with the version and
        soonest deadline that say whether they still hold; None if none are kept, or
        they were read over ``KEEP_GROUPED_S`` ago."""
        kept = self._grouped.get((ns, group))
        if kept is None or kept.version is None or not kept.soonest:
            return None
        if time.monotonic() - kept.read_at > KEEP_GROUPED_S:
            return None
        return kept.version, kept.soonest, kept.owned

    def grouped(
        self, ns: str, group: str, names: list[bytes], version: bytes | None, soonest: int
    ) -> dict[str | None, Owned]:
        """``names`` (a group's live members, read at ``version``) by owning client (None:
        normal channels), kept for the next sends."""
        kept = self._grouped.get((ns, group))
        same = kept is not None and kept.names == names
        owned = kept.owned if kept is not None and same else self._by_owner(names)
        if len(self._grouped) >= KEPT_GROUPS and (ns, group) not in self._grouped:
            del self._grouped[next(iter(self._grouped))]
        self._grouped[(ns, group)] = Kept(names, owned, version, soonest, time.monotonic())
        return owned

    @staticmethod
    def _by_owner(names: list[bytes]) -> dict[str | None, Owned]:
        by_owner: dict[str | None, list[str]] = defaultdict(list)
        for name in names:
            channel = name.decode()
            by_owner[client_id_of(channel) if "!" in channel else None].append(channel)
        return {
            owner: (channels, encode_channels(channels), " ".join(channels))
            for owner, channels in by_owner.items()
        }

    async def fan_out(
        self,
        ns: str,
        owned: dict[str | None, Owned],
        payload: bytes,
        capacity: int,
        expiry_s: float,
        check: Check | None = None,
    ) -> tuple[int, list[str]] | None:
        """Fan out to the owners here that can take it now, and to those attached to
        another daemon of this release (``remote``); -> the members reached so, and the
        channels left to store per member. With ``check`` (``owned`` was read before),
        None, having done nothing, if the group changed since: read it again."""
        owners, rest = self.owners, []
        chosen: list[tuple[str, EdgeOwner, Owned]] = []
        away: list[tuple[str, Owned]] = []
        for client, members in owned.items():
            owner = None if client is None else owners.get((ns, client))
            if owner is not None and owner.can_fan_out(len(members[1]) + len(payload)):
                assert client is not None
                chosen.append((client, owner, members))
            elif owner is None and client is not None:
                away.append((client, members))
            else:
                rest += members[0]
        if not chosen and not away:
            if check is not None and not await self._same(check):
                return None
            return 0, rest
        token = PushedLeases.new_token()
        marked = await self._lease(ns, chosen, away, token, payload, (capacity, expiry_s), check)
        if marked is None:
            return None
        edge = 0
        for (_, members), ok in zip(away, marked, strict=True):
            if ok:
                edge += len(members[0])
            else:  # not marked: its daemon is of an earlier release, or it is away
                rest += members[0]
        return edge + await self._push(ns, chosen, token, payload, capacity, expiry_s), rest

    async def _push(
        self,
        ns: str,
        chosen: list[tuple[str, EdgeOwner, Owned]],
        token: str,
        payload: bytes,
        capacity: int,
        expiry_s: float,
    ) -> int:
        """One PUSH per chosen owner, its record leased already; -> members reached."""
        owners, edge, back, ttl = self.owners, 0, [], ttl_ms(expiry_s)
        for client, owner, (channels, listed, _) in chosen:
            # The await let other work run: the owner may be gone, or have pushes first.
            if owners.get((ns, client)) is owner and owner.can_fan_out(len(listed) + len(payload)):
                lease = FanOutLease(len(channels), lease_name(client, token))
                owner.fan_out(listed, payload, ttl, capacity, lease)
                self._live.setdefault((ns, client), set()).add(token)
                edge += len(channels)
            else:
                back.append(lease_name(client, token))
        if back:
            await self.give_back(ns, back)
        return edge

    async def _lease(
        self,
        ns: str,
        chosen: list[tuple[str, EdgeOwner, Owned]],
        away: list[tuple[str, Owned]],
        token: str,
        payload: bytes,
        limits: tuple[int, float],
        check: Check | None,
    ) -> list[bool] | None:
        """One ``FANOUT_LEASE`` per slot (one outside Cluster) for the chosen owners
        (leased here) and those away (appended to their list if marked); -> per owner
        away whether it was marked, or None if ``check`` found the group changed (then
        nothing was written). Outside Cluster the check is part of the script; in
        Cluster it goes first."""
        topology = self._commands.require()
        is_cluster = topology.is_cluster
        if check is not None and is_cluster:
            if not await self._same(check):
                return None
            check = None
        capacity, expiry_s = limits
        head = [token, self.lease_ms, max(1, round(expiry_s * 1000)), KEEP_MARGIN_MS, payload]
        head += ["", 0, topology.publish_command, self.origin]
        by_slot: dict[int, tuple[list[str], list[Any]]] = defaultdict(lambda: ([], head[:]))
        owners = [("L", client, members) for client, _, members in chosen]
        owners += [("R", client, members) for client, members in away]
        slots: list[int] = []
        for kind, client, members in owners:
            keys = self._remote_keys(ns, client)
            slots.append(Keys.slot(keys[0]) if is_cluster else 0)
            by_slot[slots[-1]][0].extend(keys)
            by_slot[slots[-1]][1].append(f"{kind} {capacity} {members[2]}")
        if check is not None:  # one slot: outside Cluster
            by_slot[0][0].append(check[0])
            by_slot[0][1][5:7] = check[1:]
        calls = (self._commands.run(FANOUT_LEASE, *call) for call in by_slot.values())
        replies = dict(zip(by_slot, await asyncio.gather(*calls), strict=True))
        kept = _per_owner(replies, slots)
        return None if kept is None else kept[len(chosen) :]

    async def _same(self, check: Check) -> bool:
        """True if the group's members read before still hold (``GROUP_SAME``)."""
        key, version, soonest = check
        return bool(await self._commands.run(GROUP_SAME, [key], [version, soonest]))

    def record_keys(self, ns: str, client: str) -> tuple[str, str]:
        base = self._keys.base(f"{ns}!{client}")
        return f"{base}f", f"{base}fd"

    def _remote_keys(self, ns: str, client: str) -> tuple[str, str, str, str]:
        """An owner's record hash, lease zset, mark and fan-out list (``remote``)."""
        base = self._keys.base(f"{ns}!{client}")
        return f"{base}f", f"{base}fd", f"{base}a", f"{base}fq"

    # -- records taken from an owner's list (``remote``) ---------------------------

    async def deliver(
        self, ns: str, client: str, now_ms: int, records: list[tuple[str, bytes, bytes]]
    ) -> None:
        """Push records another daemon kept for an owner attached here, leased to us
        now (token, entry, ``<capacity> <channel>...``), one PUSH each, in order; from
        the first the owner cannot take in order, store them per member instead."""
        back: list[str] = []
        owner = self.owners.get((ns, client))
        for token, entry, listed in records:
            capacity, _, names = listed.partition(b" ")
            encoded, count = self._encoded(names)
            payload = entry[DEADLINE_DIGITS:]
            fits = owner is not None and owner.can_fan_out(len(encoded) + len(payload))
            if back or not fits:
                back.append(lease_name(client, token))
                continue
            assert owner is not None
            ttl = max(1, int(entry[:DEADLINE_DIGITS]) - now_ms)
            owner.fan_out(
                encoded, payload, ttl, int(capacity), FanOutLease(count, lease_name(client, token))
            )
            self._live.setdefault((ns, client), set()).add(token)
        if back:
            await self.give_back(ns, back)

    def _encoded(self, names: bytes) -> tuple[bytes, int]:
        """A record's member list as a PUSH carries it, and its length."""
        known = self._listed.get(names)
        if known is None:
            if len(self._listed) >= KEPT_LISTS:
                self._listed.clear()
            channels = names.decode().split(" ")
            known = self._listed[names] = (encode_channels(channels), len(channels))
        return known

    # -- after the push ----------------------------------------------------------

    def end(self, ns: str, leases: Sequence[str]) -> None:
        """The layer acknowledged these fan-outs: forget their records, with the other
        acknowledgements of this loop pass, one script per slot, in the background (one
        that is not forgotten lapses, and its copies are dropped by the layer)."""
        if not self._ends:
            asyncio.get_running_loop().call_soon(self._send_ends)
        for client, tokens in self._by_client(ns, leases).items():
            self._ends[self.record_keys(ns, client)].extend(tokens)

    def _send_ends(self) -> None:
        ends, self._ends = self._ends, defaultdict(list)
        topology = self._commands.topology
        if topology is None:
            return
        by_slot: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for keys in ends:
            by_slot[Keys.slot(keys[0]) if topology.is_cluster else 0].append(keys)
        for owners in by_slot.values():
            args: list[Any] = []
            for keys in owners:
                args += [len(ends[keys]), *ends[keys]]
            record_keys = [key for keys in owners for key in keys]
            self._commands.spawn(self._commands.run(END_FANOUTS, record_keys, args))

    async def give_back(self, ns: str, leases: Sequence[str]) -> None:
        """These fan-outs were not acknowledged: store each for its members, now."""
        pubcmd = self._commands.require().publish_command
        for client, tokens in self._by_client(ns, leases).items():
            head = [self._keys.base(f"{ns}!{client}"), pubcmd, KEEP_MARGIN_MS]
            head.append(EXPAND_MOST_MEMBERS)
            while tokens:  # a slice of members a call (``edge_scripts``)
                reply = await self._commands.run(
                    GIVE_BACK_FANOUTS, [self._keys.index(ns, client)], [*head, *tokens]
                )
                tokens = tokens[int(reply[0]) :]
                for name in reply[1:]:
                    self.wake(ns, name.decode())

    def _by_client(self, ns: str, leases: Sequence[str]) -> dict[str, list[str]]:
        by_client: dict[str, list[str]] = defaultdict(list)
        for lease in leases:
            client, _, token = lease.partition(" ")
            by_client[client].append(token)
            live = self._live.get((ns, client))
            if live is not None:
                live.discard(token)
                if not live:
                    del self._live[(ns, client)]
        return by_client

    def drop_namespace(self, ns: str) -> None:
        for key in [key for key in self._live if key[0] == ns]:
            del self._live[key]
        for key in [key for key in self._grouped if key[0] == ns]:
            del self._grouped[key]

    # -- renewal -------------------------------------------------------------------

    def start(self) -> None:
        self._renewer.start()

    def stop(self) -> None:
        self._renewer.stop()

    async def renew_once(self) -> None:
        """Renew every fan-out lease this daemon holds: one script per owner."""
        calls: list[Any] = []
        for (ns, client), tokens in list(self._live.items()):
            args = [self.lease_ms, KEEP_MARGIN_MS, *tokens]
            calls.append(self._commands.run(RENEW_FANOUTS, self.record_keys(ns, client), args))
        await asyncio.gather(*calls)


def _per_owner(replies: dict[int, Any], slots: list[int]) -> list[bool] | None:
    """``FANOUT_LEASE``'s replies by slot -> per owner (of ``slots``: each owner's, in
    order) whether its record was kept; None if the group changed (the check is in the
    one call outside Cluster)."""
    if not all(isinstance(reply, list) for reply in replies.values()):
        return None
    at = dict.fromkeys(replies, 0)  # each reply starts with 1, then one per owner
    kept: list[bool] = []
    for slot in slots:
        at[slot] += 1
        kept.append(bool(replies[slot][at[slot]]))
    return kept


def lease_name(client: str, token: str) -> str:
    """A fan-out's name as the daemon keeps it (``FanOutLease.lease``)."""
    return f"{client} {token}"
