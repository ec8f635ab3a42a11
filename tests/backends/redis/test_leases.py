"""Leases on Redis: a worker's message stays in Redis until acknowledged, and one whose
lease lapses goes back to its place in the queue (``backends/redis/leases.py``)."""

from __future__ import annotations

import asyncio

import pytest

from backends import Backend, BackendError, LeasesToConsumers, backend_from_url
from backends.redis import RedisBackend
from backends.redis.url import RedisSettings
from tests import servers
from tests.backends.test_backend_contract import WakeupLog, drain, put

#: The shortest lease: what a fault left leased comes back after a second.
LEASE_S = 1.0


@pytest.fixture(params=["redis://", "redis+cluster://"], ids=["redis", "redis+cluster"])
def leasing(request: pytest.FixtureRequest) -> Backend:
    """A Redis backend with the shortest lease."""
    return backend_from_url(f"{servers.backend_url(request.param)}&lease={LEASE_S:g}")


def test_the_lease_is_a_url_option() -> None:
    assert RedisSettings.from_url("redis://h?lease=7.5").lease_s == 7.5
    assert RedisSettings.from_url("redis://h").lease_s == 5.0
    for bad in ("0.5", "x", "-1"):
        with pytest.raises(BackendError):
            backend_from_url(f"redis://h?lease={bad}")


async def lapse() -> None:
    """Wait out a lease (the fault the test stands for lasts this long)."""
    await asyncio.sleep(LEASE_S + 0.1)


async def test_a_lease_not_acknowledged_gives_its_message_back_in_its_place(
    leasing: Backend, ns: str
) -> None:
    """1. Three messages wait; a consumer's take leases the first two and never
       acknowledges them (its DELIVER was lost with its connection: renewal stops).
    2. Once the lease lapsed the next take gets them again, first and in order, then
       the third; the daemon counts the two as given back."""
    assert isinstance(leasing, LeasesToConsumers)
    for payload in (b"1", b"2", b"3"):
        assert await put(leasing, ns, "work", payload)
    taken = await leasing.take_leased(ns, "work", 2)
    assert [t.payload for t in taken] == [b"1", b"2"]
    assert taken[0].lease and taken[0].lease == taken[1].lease
    assert isinstance(leasing, RedisBackend)
    leasing.abandon(ns, "work", [taken[0].lease])
    await lapse()
    assert await drain(leasing, ns, "work") == [b"1", b"2", b"3"]
    assert leasing.stats().given_back_total == 2


async def test_an_acknowledged_lease_ends_and_a_malformed_one_is_ignored(
    leasing: Backend, ns: str
) -> None:
    """A consumer acknowledges its message (along with a token of no take of ours):
    once the lease would have lapsed nothing comes back."""
    assert isinstance(leasing, LeasesToConsumers)
    assert await put(leasing, ns, "work", b"1")
    (taken,) = await leasing.take_leased(ns, "work", 1)
    await leasing.acknowledge(ns, "work", ["not.a-lease", "1.2.3", taken.lease])
    await lapse()
    assert await drain(leasing, ns, "work") == []
    assert leasing.stats().given_back_total == 0


async def test_the_reaper_gives_back_a_watched_channels_lapsed_lease(
    leasing: Backend, ns: str
) -> None:
    """A daemon with a worker waiting on a channel (it watches it) gives back a lapsed
    lease there without any take, and the wake-up reaches it: the waiting pull is
    served, whichever daemon took the message first."""
    assert isinstance(leasing, RedisBackend)
    log = WakeupLog()
    leasing.set_wakeup(log)
    leasing.watch(ns, "work")
    assert await put(leasing, ns, "work", b"1")
    (taken,) = await leasing.take_leased(ns, "work", 1)  # never acknowledged
    leasing.abandon(ns, "work", [taken.lease])  # its connection closed
    log.calls.clear()
    await log.wait_for({(ns, "work")}, timeout_s=LEASE_S + 2 * leasing._leases.reap_interval_s)
    assert leasing.stats().given_back_total == 1
    assert await drain(leasing, ns, "work") == [b"1"]


async def test_a_plain_take_for_workers_ends_its_own_lease(leasing: Backend, ns: str) -> None:
    """A take without a consumer that acknowledges (an older layer) ends its lease by
    itself, a moment after: nothing comes back."""
    assert await put(leasing, ns, "work", b"1")
    assert await drain(leasing, ns, "work") == [b"1"]
    await lapse()
    assert await drain(leasing, ns, "work") == []


async def test_a_lease_is_renewed_until_its_connection_is_abandoned(
    leasing: Backend, ns: str
) -> None:
    """1. A consumer's take leases a message; its ACK is late (the consumer is busy)
       by three leases: the daemon renews the lease meanwhile, nothing comes back.
    2. Its connection closes unacknowledged (``abandon``): the lease lapses within a
       lease, and the message comes back (issue 15: a busy worker's message went to
       another worker too)."""
    assert isinstance(leasing, RedisBackend)
    assert await put(leasing, ns, "work", b"1")
    (taken,) = await leasing.take_leased(ns, "work", 1)
    for _ in range(3):
        await lapse()
        assert await drain(leasing, ns, "work") == []
    leasing.abandon(ns, "work", [taken.lease])
    await lapse()
    assert await drain(leasing, ns, "work") == [b"1"]
