"""Fan-outs at the edge on Redis (``backends/redis/edge.py``): a group send to an owner
attached to the sending daemon keeps one leased record for that owner, and stores no
copy per member; the record ends with the layer's ACK, and is stored for each member,
a bounded slice per script, when its connection closes first or its lease lapses (a
daemon killed).

The owner here stands for the daemon's connection (``backends.EdgeOwner``: two methods):
it records the fan-outs it is handed, as the connection would write them.
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from backends import Backend, FanOutLease, FansOutAtTheEdge, LeasesFanOuts, backend_from_url
from tests import servers
from tests.backends.test_backend_contract import capacity

#: The shortest lease: what a dead daemon held is stored after a second.
LEASE_S = 1.0
CLIENT = "feed0000"
#: More members than one script stores (``EXPAND_MOST_MEMBERS``): several slices.
MEMBERS = 600
LONG_S = 60.0


class RecordingOwner:
    """A connection that takes every fan-out, and notes each."""

    def __init__(self) -> None:
        self.fanouts: list[tuple[list[str], bytes, FanOutLease | None]] = []
        self.takes_fanouts = True

    def can_fan_out(self, frame_bytes: int) -> bool:
        return True

    def fan_out(
        self,
        channels: bytes,
        payload: bytes,
        ttl_ms: int,
        capacity: int,
        lease: FanOutLease | None = None,
    ) -> None:
        self.fanouts.append((msgpack.unpackb(channels), payload, lease))


@pytest.fixture(params=["redis://", "redis+cluster://"], ids=["redis", "redis+cluster"])
def url(request: pytest.FixtureRequest) -> str:
    return f"{servers.backend_url(request.param)}&lease={LEASE_S:g}"


async def fanned_out(url: str, ns: str, group: str) -> tuple[Backend, RecordingOwner, list[str]]:
    """A daemon's backend with the owner attached, a group of ``MEMBERS`` of the owner's
    channels, and one group send to it."""
    backend = backend_from_url(url)
    assert isinstance(backend, FansOutAtTheEdge) and isinstance(backend, LeasesFanOuts)
    await backend.connect()
    owner = RecordingOwner()
    backend.set_edge_owners({(ns, CLIENT): owner})
    members = [f"specific.{CLIENT}!{n}" for n in range(MEMBERS)]
    for at in range(0, MEMBERS, 100):
        await asyncio.gather(
            *(
                backend.group_add(ns, group, m, group_expiry_s=LONG_S)
                for m in members[at : at + 100]
            )
        )
    result = await backend.group_send(
        ns, group, b"hello", capacity_of=capacity(10), expiry_s=LONG_S
    )
    assert result.edge == MEMBERS and not result.delivered
    return backend, owner, members


async def stored_for_each(backend: Backend, ns: str, members: list[str]) -> None:
    for member in members:
        taken = await backend.take(ns, member, 10, hold=False)
        assert [t.payload for t in taken] == [b"hello"], member


async def test_a_fan_out_is_one_record_and_ends_with_its_acknowledgement(url: str, ns: str) -> None:
    backend, owner, members = await fanned_out(url, ns, "room")
    try:
        [(channels, payload, lease)] = owner.fanouts
        assert sorted(channels) == sorted(members) and payload == b"hello"
        assert lease is not None and lease.members == MEMBERS
        assert await backend.channels_with_messages(ns, CLIENT) == [], "no copy per member"
        assert isinstance(backend, LeasesFanOuts)
        await backend.end_fanouts(ns, [lease.lease])
        await asyncio.sleep(LEASE_S + 0.2)  # past the lease, by Redis time: no event
        assert await backend.channels_with_messages(ns, CLIENT) == []
    finally:
        await backend.close()


async def test_a_fan_out_given_back_is_stored_for_each_member(url: str, ns: str) -> None:
    backend, owner, members = await fanned_out(url, ns, "room")
    try:
        [(_, _, lease)] = owner.fanouts
        assert lease is not None and isinstance(backend, LeasesFanOuts)
        await backend.give_back_fanouts(ns, [lease.lease])
        assert len(await backend.channels_with_messages(ns, CLIENT)) == MEMBERS
        await stored_for_each(backend, ns, members)
    finally:
        await backend.close()


async def test_a_dead_daemons_fan_out_is_stored_once_its_lease_lapses(url: str, ns: str) -> None:
    dying, _, members = await fanned_out(url, ns, "room")
    await dying.close()  # as a SIGKILL would: nothing renews or ends the record
    other = backend_from_url(url)
    await other.connect()
    try:
        assert await other.channels_with_messages(ns, CLIENT) == [], "leased still"
        await asyncio.sleep(LEASE_S + 0.2)  # the lease lapses by Redis time: no event
        assert len(await other.channels_with_messages(ns, CLIENT)) == MEMBERS
        await stored_for_each(other, ns, members)
    finally:
        await other.close()


async def test_the_member_list_follows_changes_lapses_and_other_daemons(url: str, ns: str) -> None:
    """A daemon keeps a group's members by owner between sends while the group's version
    in Redis says they hold: a member that lapses, one discarded through another daemon,
    and one that comes back after lapsing each reach the next send."""
    sending, other = backend_from_url(url), backend_from_url(url)
    await asyncio.gather(sending.connect(), other.connect())
    assert isinstance(sending, FansOutAtTheEdge)
    owner = RecordingOwner()
    sending.set_edge_owners({(ns, CLIENT): owner})
    short, staying, leaving = (f"specific.{CLIENT}!{name}" for name in ("s", "t", "l"))

    async def listed() -> list[str]:
        await sending.group_send(ns, "room", b"m", capacity_of=capacity(10), expiry_s=LONG_S)
        return sorted(owner.fanouts[-1][0])

    try:
        await sending.group_add(ns, "room", short, group_expiry_s=LEASE_S)
        for member in (staying, leaving):
            await sending.group_add(ns, "room", member, group_expiry_s=LONG_S)
        assert await listed() == sorted([short, staying, leaving])
        assert await listed() == sorted([short, staying, leaving])  # kept, the same
        await other.group_discard(ns, "room", leaving)
        assert await listed() == sorted([short, staying])
        await asyncio.sleep(LEASE_S + 0.1)  # the membership lapses by Redis time
        assert await listed() == [staying]
        await other.group_add(ns, "room", short, group_expiry_s=LONG_S)
        assert await listed() == sorted([short, staying])
    finally:
        await asyncio.gather(sending.close(), other.close())
