"""Windowed sends through storage restarts, counting every message: none accepted is
lost, none reaches the application twice (issue 15).

The soak on Redis lost messages to workers at its Redis restarts: a sender's windowed
send that storage failed was sent again by its layer on its next connection, but
meanwhile a later send of the same client had been stored (storage was back), and a
record of "the highest seq handled" then took the earlier one for stored: answered,
never stored. Here senders send at an application's pace to a normal channel that
workers pull, through two daemons on one throwaway storage server restarted eight
times under that traffic; every other send is a ``group_send`` (to a group with no
members), which waits out the outage and is sent again until storage answers, so that
the sender's next send goes out the moment storage is back. On the code before the
fix, each run on Redis lost 11 to 46 accepted messages (five runs of five).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterator

import pytest
from channels.exceptions import ChannelFull

from broker.layer import BrokerChannelLayer, BrokerUnavailable
from tests.broker.daemon.test_faults import Ledger, work
from tests.broker.daemon.test_storage_restart import Storage, postgres_storage, redis_storage
from tests.conftest import BrokerProcess

SENDERS = 16
#: Between two sends of a sender, as an application's pace (the soak's is 40 ms): a send
#: may then go out while the layer's connection waits to be dropped after storage
#: failed an accepted one, and meet storage that came back meanwhile.
SEND_PAUSE_S = 0.02
#: One group_send (to a group with no member) per this many sends (the soak's senders
#: group-send too): unnumbered, it is sent again until storage is back.
GROUP_SEND_EVERY = 2
EMPTY_GROUP = "no-members"
WORKERS = 4
RESTARTS = 8
#: Traffic before the first restart and between restarts (sends go on throughout).
BETWEEN_S = 1.0
#: The daemon's most (``--max-capacity``): workers keep up, so full is rare (and counted).
CAPACITY = 10_000

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=[redis_storage, postgres_storage], ids=["redis", "postgresql"])
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    made: Storage = request.param()
    yield made
    made.remove()


@pytest.fixture
def daemons(storage: Storage) -> Iterator[tuple[BrokerProcess, BrokerProcess]]:
    made = (BrokerProcess(storage.url), BrokerProcess(storage.url))
    for daemon in made:
        daemon.start()
    yield made
    for daemon in made:
        daemon.cleanup()


async def send_until_stopped(
    layer: BrokerChannelLayer,
    channel: str,
    numbers: Iterator[int],
    ledger: Ledger,
    stop: asyncio.Event,
) -> None:
    """Send numbered messages, each once, ``SEND_PAUSE_S`` apart: windowed while the
    layer holds room. A send that raises (unavailable, full) is counted as failed,
    not retried."""
    for count in itertools.count(1):
        if stop.is_set():
            return
        if count % GROUP_SEND_EVERY == 0:
            # Not numbered: it waits for storage (sent again while it is away), and the
            # sender's next numbered send then goes out as soon as storage is back.
            with contextlib.suppress(BrokerUnavailable):
                await layer.group_send(EMPTY_GROUP, {"n": -1})
        n = next(numbers)
        try:
            await layer.send(channel, {"n": n})
        except (BrokerUnavailable, ChannelFull):
            ledger.failed.add(n)
        else:
            ledger.accepted.add(n)
        await asyncio.sleep(SEND_PAUSE_S)


async def test_windowed_sends_through_storage_restarts_lose_nothing(
    storage: Storage,
    daemons: tuple[BrokerProcess, BrokerProcess],
    unique: Callable[[str], str],
) -> None:
    """1. Sixteen senders, half through daemon 1 and half through daemon 2, send
       numbered messages 20 ms apart to a normal channel (windowed sends), with a
       group_send between two; four workers pull the channel through daemon 2.
    2. The storage is restarted eight times under that traffic (Redis: SIGKILL, and
       started again from its fsync'ed append-only file; PostgreSQL: a fast stop).
    3. Every accepted message reaches a worker exactly once.
    """
    hosts = [daemon.url for daemon in daemons]

    def make(i: int) -> BrokerChannelLayer:
        """A layer through daemon 1 (even ``i``) or 2, listing the other after it."""
        return BrokerChannelLayer(hosts=hosts[i % 2 :] + hosts[: i % 2], capacity=CAPACITY)

    senders = [make(i) for i in range(SENDERS)]
    workers = make(1)
    channel, numbers, ledger, stop = unique("work"), itertools.count(), Ledger(), asyncio.Event()

    async def restart() -> None:
        await asyncio.to_thread(storage.take_down)
        await asyncio.sleep(storage.outage_s)
        await asyncio.to_thread(storage.server.start)

    reading = [asyncio.create_task(work(workers, channel, ledger)) for _ in range(WORKERS)]
    sending = [
        asyncio.create_task(send_until_stopped(layer, channel, numbers, ledger, stop))
        for layer in senders
    ]
    try:
        for _ in range(RESTARTS):
            await asyncio.sleep(BETWEEN_S)
            await restart()
        await asyncio.sleep(BETWEEN_S)
        stop.set()
        await asyncio.gather(*sending)
        await ledger.wait_for_accepted()
    finally:
        stop.set()
        for task in reading + sending:
            task.cancel()
        await asyncio.gather(*reading, *sending, return_exceptions=True)
        for layer in [workers, *senders]:
            await layer.close()
    ledger.check(workers)
    assert len(ledger.accepted) > 1000, "traffic ran"
