"""Several daemons on one Redis or PostgreSQL: one site, any daemon, nothing lost to a
daemon crash.

Each test runs once per shared storage and starts its own daemons (``broker_factory``)
on the session's Redis (with the session's key prefix) or PostgreSQL (in the session's
schema); names are unique per test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tests import servers
from tests.broker.daemon.traffic import Readers
from tests.waits import DELIVERY_TIMEOUT_S, QUIET_S, receive


@pytest.fixture(scope="module", params=["redis://", "postgresql://"], ids=["redis", "postgresql"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """The daemons of a test share the session's Redis, or its PostgreSQL."""
    url: str = servers.backend_url(request.param)
    return url


@asynccontextmanager
async def layers(*hosts: list[str], **config: Any) -> AsyncIterator[list[Any]]:
    """One layer per ``hosts`` list, closed after the body."""
    from broker.layer import BrokerChannelLayer

    made = [BrokerChannelLayer(hosts=h, **config) for h in hosts]
    try:
        yield made
    finally:
        for layer in made:
            await layer.close()


#: Messages the mid-stream stop tests send, in bursts of ``STREAM_BURST``.
STREAM_COUNT = 600
STREAM_BURST = 100


async def stream_stopping(sender: Any, channel: str, daemon: Any, readers: Readers) -> None:
    """Send ``STREAM_COUNT`` numbered messages in bursts (a backlog builds up), stop
    ``daemon`` (SIGTERM) while the third is being pulled, and wait until ``readers``
    got them all (and a little longer: a duplicate would show up then)."""
    for start in range(0, STREAM_COUNT, STREAM_BURST):
        burst = range(start, start + STREAM_BURST)
        await asyncio.gather(*(sender.send(channel, {"n": n}) for n in burst))
        if start == 2 * STREAM_BURST:
            await asyncio.to_thread(daemon.stop)
    await readers.wait_for_all(STREAM_COUNT)


async def receive_n(layer: Any, channel: str, count: int) -> list[Any]:
    return [(await receive(layer, channel))["n"] for _ in range(count)]


async def test_two_daemons_serve_one_site(
    broker_factory: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """1. A send through daemon 1 reaches a consumer of daemon 2, in order.
    2. A group_send through either daemon reaches members on both.
    3. Workers on both daemons share a normal channel: each message exactly once.
    """
    one, two = broker_factory(), broker_factory()
    # Room for all 100 work messages: two senders' send windows each hold room on the
    # channel, so a slow pair of workers (a loaded machine) could make one of them see
    # it full before 100 wait (docs/flow.md); capacity is not what this test is about.
    async with layers([one.url], [two.url], capacity=1000) as (a, b):
        channel = await b.new_channel()
        for n in range(20):
            await a.send(channel, {"n": n})
        assert await receive_n(b, channel, 20) == list(range(20))

        group = unique("room")
        on_a, on_b = await a.new_channel(), await b.new_channel()
        await a.group_add(group, on_a)
        await b.group_add(group, on_b)
        await a.group_send(group, {"n": 1})
        await b.group_send(group, {"n": 2})
        # Two writers: no order between them (a group_send returns once written).
        assert sorted(await receive_n(a, on_a, 2)) == [1, 2]
        assert sorted(await receive_n(b, on_b, 2)) == [1, 2]

        work = unique("work")
        async with Readers([(a, work), (b, work)]) as workers:
            for n in range(100):
                await (a if n % 2 else b).send(work, {"n": n})
            await workers.wait_for_all(100, DELIVERY_TIMEOUT_S)
        assert sorted(workers.got[work]) == list(range(100))


async def test_consumer_moving_to_another_daemon_gets_what_waited(
    broker_factory: Callable[..., Any],
) -> None:
    """1. A consumer on daemon 1 receives some messages, then daemon 1 stops.
    2. Messages sent meanwhile through daemon 2 wait in Redis.
    3. The consumer reconnects to daemon 2 (its second host) and gets them, in order.
    """
    one, two = broker_factory(), broker_factory()
    async with layers([one.url, two.url], [two.url]) as (consumer, sender):
        channel = await consumer.new_channel()
        for n in range(5):
            await sender.send(channel, {"n": n})
        assert await receive_n(consumer, channel, 5) == list(range(5))
        one.stop()
        for n in range(5, 15):
            await sender.send(channel, {"n": n})
        assert await receive_n(consumer, channel, 10) == list(range(5, 15))


async def test_sigkilled_daemon_loses_no_waiting_message(
    broker_factory: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """1. Through daemon 1: messages for a normal channel nobody reads yet, and for a
       consumer whose daemon is down; both wait in Redis.
    2. Daemon 1 is killed with SIGKILL, perhaps before it stored the last of them (a
       send returns once written into the room its daemon reserved: docs/flow.md);
       the sender sends again, through daemon 2, what daemon 1 did not confirm.
    3. A worker on daemon 2 gets every normal-channel message; the consumer, back on
       its restarted daemon, gets all of its own. Exactly once, in order.
    """
    one, two, home = broker_factory(), broker_factory(), broker_factory()
    hosts = [one.url, two.url]
    async with layers(hosts, [two.url], [home.url]) as (sender, worker, consumer):
        channel = await consumer.new_channel()
        await consumer.send(channel, {"n": -1})  # connects, so the client id is taken
        assert await receive_n(consumer, channel, 1) == [-1]
        home.kill()
        work = unique("work")
        for n in range(20):
            await sender.send(work, {"n": n})
            await sender.send(channel, {"n": n})
        one.kill()
        assert await receive_n(worker, work, 20) == list(range(20))
        home.start()
        assert await receive_n(consumer, channel, 20) == list(range(20))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(worker.receive(work), QUIET_S)
    one.start()  # so that the fixture's clean stop has a daemon to stop


async def test_workers_lose_nothing_when_their_daemon_stops_mid_stream(
    broker_factory: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """1. Workers on daemon 1 (with daemon 2 as their second host) and on daemon 2
       pull one normal channel busily (daemon 1 takes messages ahead of them).
    2. Daemon 1 is stopped (SIGTERM) halfway through the stream of sends.
    3. Every message arrives exactly once: what daemon 1 had taken ahead went back.
    """
    one, two = broker_factory(), broker_factory()
    hosts = [[one.url, two.url]] * 3 + [[two.url], [two.url]]
    async with layers(*hosts, capacity=1000) as (*workers, sender):
        work = unique("work")
        async with Readers((layer, work) for layer in workers) as readers:
            await stream_stopping(sender, work, one, readers)
        assert sorted(readers.got[work]) == list(range(STREAM_COUNT))
    one.start()  # so that the fixture's clean stop has a daemon to stop


async def test_a_reader_keeps_its_order_when_its_daemon_stops_mid_stream(
    broker_factory: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """1. One reader pulls a normal channel through daemon 1 (daemon 2 its second host)
       while a sender on daemon 2 sends in bursts.
    2. Daemon 1 is stopped (SIGTERM) halfway: it gives back what it took ahead before
       its clients leave.
    3. The reader gets every message once, in the order sent.
    """
    one, two = broker_factory(), broker_factory()
    async with layers([one.url, two.url], [two.url], capacity=1000) as (reader, sender):
        work = unique("work")
        # Slower than the sender: a backlog waits.
        async with Readers([(reader, work)], pace_s=0.001) as readers:
            await stream_stopping(sender, work, one, readers)
        assert readers.got[work] == list(range(STREAM_COUNT))
    one.start()  # so that the fixture's clean stop has a daemon to stop
