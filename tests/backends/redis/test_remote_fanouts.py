"""Fan-outs to owners attached to another daemon on Redis (``backends/redis/remote.py``):
the owner's daemon marks its client; a group send through another daemon appends one
record to the client's list, which the owner's daemon takes and hands its connection
as one fan-out, leased; nothing is stored per member. A record appended for a daemon
that died is stored for each member once its lease lapses, by the client's next
connection on any daemon (one of the previous release too: ``OWN_WAITING``).

Two backends stand for two daemons; ``RecordingOwner`` for the owner's connection.
"""

from __future__ import annotations

import asyncio

from backends import Backend, FanOutLease, FansOutAtTheEdge, LeasesFanOuts, backend_from_url
from tests.backends.redis.test_edge_leases import (
    CLIENT,
    LEASE_S,
    LONG_S,
    MEMBERS,
    RecordingOwner,
    stored_for_each,
    url,
)
from tests.backends.test_backend_contract import capacity

__all__ = ["url"]  # the fixture, shared

#: A client attached to the sending daemon: the send takes the path of fan-outs.
SENDER = "5e11de00"


class SignallingOwner(RecordingOwner):
    """Records fan-outs, and says when one came."""

    def __init__(self) -> None:
        super().__init__()
        self.came = asyncio.Event()

    def fan_out(
        self,
        channels: bytes,
        payload: bytes,
        ttl_ms: int,
        capacity: int,
        lease: FanOutLease | None = None,
    ) -> None:
        super().fan_out(channels, payload, ttl_ms, capacity, lease)
        self.came.set()


async def two_daemons(url: str, ns: str, group: str) -> tuple[Backend, Backend, list[str]]:
    """A sending daemon (a client of its own attached), an owning daemon (nothing
    attached yet), and a group of ``MEMBERS`` channels of ``CLIENT``."""
    sending, owning = backend_from_url(url), backend_from_url(url)
    await asyncio.gather(sending.connect(), owning.connect())
    assert isinstance(sending, FansOutAtTheEdge) and isinstance(owning, FansOutAtTheEdge)
    sending.set_edge_owners({(ns, SENDER): RecordingOwner()})
    members = [f"specific.{CLIENT}!{n}" for n in range(MEMBERS)]
    for at in range(0, MEMBERS, 100):
        adds = (sending.group_add(ns, group, m, group_expiry_s=LONG_S) for m in members[at:][:100])
        await asyncio.gather(*adds)
    return sending, owning, members


async def attach(backend: Backend, ns: str, owner: RecordingOwner) -> None:
    """As the daemon does at HELLO: own the client, watch it, look at its channels."""
    assert isinstance(backend, FansOutAtTheEdge)
    backend.set_edge_owners({(ns, CLIENT): owner})
    backend.watch(ns, CLIENT)
    assert await backend.channels_with_messages(ns, CLIENT) == []


async def send(backend: Backend, ns: str, group: str) -> None:
    result = await backend.group_send(
        ns, group, b"hello", capacity_of=capacity(10), expiry_s=LONG_S
    )
    assert result.edge == MEMBERS and not result.delivered, "one record, no copy per member"


async def test_the_owners_daemon_pushes_one_record_of_another_daemons_send(
    url: str, ns: str
) -> None:
    sending, owning, members = await two_daemons(url, ns, "room")
    owner = SignallingOwner()
    try:
        await attach(owning, ns, owner)
        await send(sending, ns, "room")
        await asyncio.wait_for(owner.came.wait(), 10)
        [(channels, payload, lease)] = owner.fanouts
        assert sorted(channels) == sorted(members) and payload == b"hello"
        assert lease is not None and lease.members == MEMBERS
        assert await sending.channels_with_messages(ns, CLIENT) == [], "no copy per member"
        assert isinstance(owning, LeasesFanOuts)
        await owning.end_fanouts(ns, [lease.lease])
    finally:
        await asyncio.gather(sending.close(), owning.close())


async def test_a_record_for_a_dead_daemon_is_stored_per_member_once_it_lapses(
    url: str, ns: str
) -> None:
    """The owner's daemon dies with its mark set; a send appends a record nobody takes;
    the client's next connection, on a daemon that does not mark it (one of the
    previous release), stores it for each member once its lease lapses."""
    sending, owning, members = await two_daemons(url, ns, "room")
    other = backend_from_url(url)
    try:
        await attach(owning, ns, RecordingOwner())
        await owning.close()  # as a SIGKILL would: its mark stays until it lapses
        await send(sending, ns, "room")
        await other.connect()
        assert await other.channels_with_messages(ns, CLIENT) == [], "not lapsed yet"
        await asyncio.sleep(LEASE_S + 0.2)  # the lease lapses by Redis time: no event
        assert len(await other.channels_with_messages(ns, CLIENT)) == MEMBERS
        await stored_for_each(other, ns, members)
    finally:
        await asyncio.gather(sending.close(), other.close())
