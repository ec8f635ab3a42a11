"""Sends and group sends to Redis: the PUSH and GROUP_SEND scripts' arguments and replies.

Theory of operation. A send is a capacity check and an append in one PUSH script, so
it costs one round trip; several sends (``send_many``, a group's members in Cluster
mode) are one PUSH per Cluster slot, all pipelined. PUSH publishes the wake-ups of
the channels it queued to (see ``scripts``), and tells per target whether it was
queued, refused as full, or grabbed back for its owner attached here (then the reply
is the entry itself, for the stash: see ``stash``). We ask for a grab only when the
owner watches its client id here, and tell PUSH whether our own subscription is among
a wake-up channel's listeners, so a lone daemon reads back no echo of its own sends.
Every channel queued to wakes our router at once (``Takes.wake``).

A group send is one GROUP_SEND script when every member has the same capacity, outside
Cluster (the script builds its members' key names itself, which Cluster forbids), and
the group has at most ``SLICE_MEMBERS`` members: it reads the live members and queues to
each one with room. Otherwise the members are read first, a page at a time, then pushed
to like a ``send_many``: one PUSH per slot (one per client process) and per
``SLICE_MEMBERS`` targets. Redis runs one script at a time, so a script over a whole
room of 100,000 members would hold every other client of that Redis for seconds; slices
of a few hundred take a millisecond or two each, and others' commands run between them.
The slices of one send go out in order on one connection, and the sender's next send
waits for them all, so each member still gets a sender's messages once and in order.
``origin`` names this daemon in the wake-ups it publishes.

When some owner is attached to this daemon, a group send with one capacity goes at the
edge where it can: the members are read, grouped by owning client, and each attached
owner that can take it gets one leased record and one PUSH, and each owner marked
attached to another daemon one record in its list, which that daemon pushes, with no
per-member work (``edge``, ``remote``); only the rest is pushed per member, as above.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from typing import Any

from backends import CapacityOf, GroupSendResult
from protocol import client_id_of

from .commands import Commands
from .edge import EdgeFanOuts, Owned
from .edge_scripts import GROUP_VERSION
from .keys import KEEP_MARGIN_MS, Keys
from .scripts import GROUP_MEMBERS, GROUP_SEND, PUSH
from .takes import Takes
from .wakeups import Subscriptions

__all__ = ["Sends", "Target"]

#: (channel, payload, capacity): one message to queue unless the channel is full.
Target = tuple[str, bytes, int]

#: Most members one script queues to: about 10-30 us each, so a slice holds Redis for a
#: few milliseconds at most, and a group of this size or less is still one round trip.
SLICE_MEMBERS = 256
#: Slices sent before waiting for their replies: enough to keep Redis busy, few enough
#: that the last one's reply comes well within the per-command ``timeout``.
SLICES_IN_FLIGHT = 16
#: Members read per page of a big group (ZSCAN's COUNT): a fraction of a millisecond.
PAGE_MEMBERS = 1000


class Sends:
    """Capacity-checked sends of one backend, single, batched or to a group."""

    def __init__(
        self,
        prefix: str,
        keys: Keys,
        commands: Commands,
        takes: Takes,
        subs: Subscriptions,
        edge: EdgeFanOuts,
        *,
        origin: str,
    ) -> None:
        #: Fan-outs at the edge, for owners attached here (``edge``).
        self.edge = edge
        self._prefix = prefix
        self._origin = origin
        self._keys = keys
        self._commands = commands
        self._takes = takes
        self._subs = subs

    async def push(self, ns: str, targets: Sequence[Target], expiry_s: float) -> list[int]:
        """Capacity-checked sends of ``targets``; the indexes refused as full."""
        if not targets:
            return []
        is_cluster = self._commands.require().is_cluster
        channels = [channel for channel, _, _ in targets]
        batches = self._keys.slot_batches(ns, channels, is_cluster=is_cluster, most=SLICE_MEMBERS)
        if len(batches) == 1:  # the common case: no task per call
            results = [await self._push_batch(ns, targets, expiry_s)]
        else:
            results = []
            for at in range(0, len(batches), SLICES_IN_FLIGHT):
                results += await asyncio.gather(
                    *(
                        self._push_batch(ns, [targets[i] for i in batch], expiry_s)
                        for batch in batches[at : at + SLICES_IN_FLIGHT]
                    )
                )
        refused: list[int] = []
        now = asyncio.get_running_loop().time()
        for batch, accepted in zip(batches, results, strict=True):
            for i, ok in zip(batch, accepted, strict=True):
                channel = targets[i][0]
                if isinstance(ok, tuple):  # grabbed for its owner here: see stash
                    self._takes.keep_grabbed(ns, channel, ok[0], now + expiry_s, now, ok[1])
                elif ok:
                    self._takes.wake(ns, channel)
                else:
                    refused.append(i)
        return sorted(refused)

    async def _push_batch(
        self, ns: str, targets: Sequence[Target], expiry_s: float
    ) -> list[int | tuple[bytes, str]]:
        """One PUSH script: per target 1 (queued), 0 (full) or the grabbed entry with
        its lease (``pushed``)."""
        topology = self._commands.require()
        pushed = self._takes.pushed
        token = pushed.new_token()
        keys: list[str] = []
        payload_numbers: dict[int, int] = {}
        payloads: list[bytes] = []
        per_target: list[Any] = []
        grabs: list[int] = []
        for number, (channel, payload, capacity) in enumerate(targets):
            keys += self._keys.channel_keys(ns, channel)
            payload_number = payload_numbers.get(id(payload))
            if payload_number is None:
                payloads.append(payload)
                payload_number = payload_numbers[id(payload)] = len(payloads)
            wake = self._keys.wake(ns, channel)
            # Whether our own subscription is among the listeners (see PUSH).
            mine = int(topology.is_listening(wake.encode()))
            grab = self._may_grab(ns, channel)
            per_target += [channel, capacity, payload_number, wake, mine]
            per_target.append(pushed.grab_arg(token, number) if grab else 0)
            grabs += [number] if grab else []
        args = [_ms(expiry_s), _ms(expiry_s) + KEEP_MARGIN_MS, self._origin]
        args += [topology.publish_command, len(payloads), *payloads, *per_target]
        try:
            reply = await self._commands.run(PUSH, keys, args)
        except BaseException:
            # It may have run and grabbed: the channel's next take gives that back.
            for number in grabs:
                pushed.lost(ns, targets[number][0], f"{token}-{number}")
                self._takes.wake(ns, targets[number][0])
            raise
        return [
            (ok, pushed.grabbed(ns, targets[i][0], token, i)) if isinstance(ok, bytes) else int(ok)
            for i, ok in enumerate(reply)
        ]

    def _may_grab(self, ns: str, channel: str) -> bool:
        """Whether a send to ``channel`` may grab it back for its owner here: not past a
        take or grab whose answer was lost (the channel's next take gives it back)."""
        return (
            "!" in channel
            and self._subs.owns(ns, client_id_of(channel))
            and not self._takes.pushed.has_lost(ns, channel)
        )

    async def group_send(
        self,
        ns: str,
        group: str,
        payload: bytes,
        *,
        capacity_of: CapacityOf,
        expiry_s: float,
    ) -> GroupSendResult:
        """One script call when every member has the same capacity (outside Cluster);
        else read the members, then one push script per slot."""
        topology = self._commands.require()
        key = self._keys.group(ns, group)
        uniform = capacity_of.uniform
        if uniform is not None and self.edge.owners:  # some owner may be attached here
            return await self._fan_out(ns, key, group, payload, uniform, expiry_s)
        if uniform is not None and not topology.is_cluster:
            args = [self._prefix, ns, _ms(expiry_s), _ms(expiry_s) + KEEP_MARGIN_MS]
            args += [self._origin, topology.publish_command, payload, uniform, SLICE_MEMBERS]
            reply = await self._commands.run(GROUP_SEND, [key], args)
            if int(reply[0]) >= 0:
                delivered = [name.decode() for name in reply[1:]]
                for channel in delivered:
                    self._takes.wake(ns, channel)
                return GroupSendResult(delivered=delivered, skipped=int(reply[0]))
        members = await self._members(key)
        capacities = await capacity_of.all_of(members)
        targets = [(channel, payload, n) for channel, n in zip(members, capacities, strict=True)]
        refused = set(await self.push(ns, targets, expiry_s))
        delivered = [channel for i, channel in enumerate(members) if i not in refused]
        return GroupSendResult(delivered=delivered, skipped=len(refused))

    async def _fan_out(
        self, ns: str, key: str, group: str, payload: bytes, capacity: int, expiry_s: float
    ) -> GroupSendResult:
        """At the edge for owners attached here (``edge``), per member for the rest."""
        version_key, kept = self._keys.group_version(ns, group), self.edge.kept(ns, group)
        done = None
        if kept is not None:  # as read before, if the group did not change (checked)
            version, soonest, owned = kept
            check = (version_key, version, soonest)
            done = await self.edge.fan_out(ns, owned, payload, capacity, expiry_s, check)
        if done is None:
            owned = await self._read_owned(ns, group, key, version_key)
            done = await self.edge.fan_out(ns, owned, payload, capacity, expiry_s)
        assert done is not None  # no check, nothing to fail
        edge, rest = done
        refused = set(await self.push(ns, [(c, payload, capacity) for c in rest], expiry_s))
        delivered = [channel for i, channel in enumerate(rest) if i not in refused]
        return GroupSendResult(delivered=delivered, skipped=len(refused), edge=edge)

    async def _read_owned(
        self, ns: str, group: str, key: str, version_key: str
    ) -> dict[str | None, Owned]:
        """The group's live members by owning client, read (its version first, so a
        change meanwhile shows at the next send) and kept for the next sends (``edge``),
        which use them again while the version holds and none of them lapsed."""
        version = await self._commands.run(
            GROUP_VERSION, [key, version_key], [secrets.token_hex(8)]
        )
        names, soonest = await self._member_names(key)
        return self.edge.grouped(ns, group, names, version, soonest)

    async def _members(self, key: str) -> list[str]:
        """A group's live members (each once, in the order first met)."""
        return [name.decode() for name in (await self._member_names(key))[0]]

    async def _member_names(self, key: str) -> tuple[list[bytes], int]:
        """A group's live members as Redis names them, a page per call, and the soonest
        deadline of their memberships (ms, Redis time; 0: none)."""
        members: dict[bytes, None] = {}
        cursor: bytes | str = "0"
        soonest = 0
        while True:
            page = await self._commands.run(GROUP_MEMBERS, [key], [cursor, PAGE_MEMBERS])
            members.update(dict.fromkeys(page[2:]))
            if int(page[1]) and (not soonest or int(page[1]) < soonest):
                soonest = int(page[1])
            cursor = page[0]
            if cursor in (b"0", "0"):
                return list(members), soonest


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
