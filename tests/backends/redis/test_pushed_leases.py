"""Leases on pushed messages, on Redis: what a daemon takes to push to a client's own
channel stays in Redis until the layer's ACK covers it, renewed while the daemon lives,
and comes back to the client's next connection when the daemon dies
(``backends/redis/pushed.py``)."""

from __future__ import annotations

import asyncio

import pytest

from backends import Backend, backend_from_url
from tests import servers
from tests.backends.test_backend_contract import put

#: The shortest lease: what a dead daemon held comes back after a second.
LEASE_S = 1.0
CLIENT = "c0ffee00"
CHANNEL = f"specific.{CLIENT}!x"


@pytest.fixture(params=["redis://", "redis+cluster://"], ids=["redis", "redis+cluster"])
def url(request: pytest.FixtureRequest) -> str:
    return f"{servers.backend_url(request.param)}&lease={LEASE_S:g}"


@pytest.fixture
def other(url: str) -> Backend:
    """The daemon the client reconnects to, on the same Redis."""
    return backend_from_url(url)


async def payloads_taken(backend: Backend, ns: str, hold: bool = True) -> list[bytes]:
    return [t.payload for t in await backend.take(ns, CHANNEL, 100, hold=hold)]


async def waiting_channels(backend: Backend, ns: str) -> list[str]:
    """The client's channels with messages, once there are some (a lease lapses)."""
    async with asyncio.timeout(LEASE_S * 3):
        while not (channels := await backend.channels_with_messages(ns, CLIENT)):
            await asyncio.sleep(0.05)  # the lease lapses by Redis time: no event
    return channels


async def test_pushes_of_a_dead_daemon_come_back_in_order_and_uncounted(
    url: str, other: Backend, ns: str
) -> None:
    """1. Three messages wait on a client's channel of capacity 4; its daemon takes
       two to push them (leased, held) and dies (it renews nothing more).
    2. While the lease runs the client's next daemon sees only the third.
    3. Once it lapsed the two are back at the head, no longer held: the channel takes
       a fourth, and a take gets all four in order."""
    dying = backend_from_url(url)
    await dying.connect()
    for payload in (b"1", b"2", b"3"):
        assert await put(other, ns, CHANNEL, payload, cap=4)
    taken = await dying.take(ns, CHANNEL, 2, hold=True)
    assert [t.payload for t in taken] == [b"1", b"2"]
    assert all(t.lease for t in taken)
    await dying.close()  # as a SIGKILL would: what it took stays leased
    assert not await put(other, ns, CHANNEL, b"x", cap=3), "the two are still held"
    await asyncio.sleep(LEASE_S + 0.1)  # the lease lapses by Redis time: no event
    assert await other.channels_with_messages(ns, CLIENT) == [CHANNEL]
    assert await put(other, ns, CHANNEL, b"4", cap=4), "given back: held no longer"
    assert await payloads_taken(other, ns, hold=False) == [b"1", b"2", b"3", b"4"]


async def test_held_pushes_are_renewed_and_end_with_their_acknowledgement(
    url: str, other: Backend, ns: str
) -> None:
    """1. A daemon takes two messages to push; its client is slow: it holds them for
       three leases, and no other take gets a copy meanwhile.
    2. The client acknowledges both: their leases end and they are held no longer; once
       a lease would have lapsed nothing comes back."""
    pushing = backend_from_url(url)
    await pushing.connect()
    try:
        for payload in (b"1", b"2"):
            assert await put(other, ns, CHANNEL, payload, cap=2)
        taken = await pushing.take(ns, CHANNEL, 2, hold=True)
        await asyncio.sleep(LEASE_S * 3)  # a slow consumer: no event to wait for
        assert await other.channels_with_messages(ns, CLIENT) == []
        assert await payloads_taken(other, ns) == [], "renewed: no copy"
        await pushing.release_taken(ns, CHANNEL, 2, [t.lease for t in taken])
        # Queued; its daemon's next command goes after it (and waits for it here).
        assert await pushing.channels_with_messages(ns, CLIENT) == []
        assert await put(other, ns, CHANNEL, b"3", cap=1), "released with the ACK"
        await asyncio.sleep(LEASE_S * 1.5)  # nothing must come back: no event for that
        assert await payloads_taken(other, ns, hold=False) == [b"3"]
    finally:
        await pushing.close()


async def test_a_message_grabbed_for_its_owner_is_leased_too(
    url: str, other: Backend, ns: str
) -> None:
    """A send hands a message straight back to the daemon its owner is attached to (a
    grab); that daemon pushes it and dies: it comes back to the owner's next daemon."""
    dying = backend_from_url(url)
    await dying.connect()
    dying.watch(ns, CLIENT)
    assert await put(dying, ns, CHANNEL, b"1")
    (taken,) = await dying.take(ns, CHANNEL, 10, hold=True)
    assert taken.payload == b"1" and taken.lease
    await dying.close()
    assert await waiting_channels(other, ns) == [CHANNEL]
    assert await payloads_taken(other, ns, hold=False) == [b"1"]
