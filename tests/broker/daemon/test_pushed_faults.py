"""Messages pushed to a client's own channel survive a cut connection, counting every
message: none accepted is lost, none reaches the application twice (issue 15).

A consumer's channel (``new_channel()``) is pushed to its connection as PUSH frames,
and each message counts as held until the consumer's layer acknowledges it (by count,
as ``receive`` takes it). The daemon keeps what it pushed until then; a connection that
closes without acknowledging gives it back at the head of its channel's queue, and the
consumer, reconnecting under the same client id, gets it again (its layer drops a copy
of one it handed to ``receive`` already, by its message id). On Redis a daemon killed
outright loses none either: what it pushed stays leased in Redis until acknowledged,
and comes back to the consumer's next connection once the lease lapses; on PostgreSQL
likewise, whether the message was stored and taken out for the push or pushed directly
(written leased in the send's own commit).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from broker.layer import BrokerChannelLayer
from tests import servers
from tests.conftest import BrokerProcess
from tests.proxy import CutProxy
from tests.waits import IN_FLIGHT_S, RECOVERY_TIMEOUT_S

COUNT = 600
IN_FLIGHT = 20
#: Messages sent between two cuts.
ROUND = 100
#: The consumer's pause after each message (a consumer slower than its sender).
READ_PAUSE_S = 0.002


async def read_all(
    layer: BrokerChannelLayer, channel: str, got: list[int], changed: asyncio.Event
) -> None:
    """The consumer: receive, note, again (``receive`` waits through reconnects). It is
    slower than the sender, so messages wait in its layer's buffer when a cut comes:
    those are pushed again, and the layer must drop the copies."""
    while True:
        message = await layer.receive(channel)
        got.append(message["n"])
        changed.set()
        await asyncio.sleep(READ_PAUSE_S)


async def send_into_a_stall(
    sender: BrokerChannelLayer, channel: str, numbers: range, proxy: CutProxy, how: str = "send"
) -> None:
    """Send ``numbers``, the second half while the proxy holds what the daemon writes to
    the consumer: those PUSHes pile up in the proxy and the kernel's buffers."""
    half = numbers.start + len(numbers) // 2
    await send_round(sender, channel, range(numbers.start, half), how)
    proxy.stall_replies()
    await send_round(sender, channel, range(half, numbers.stop), how)
    await asyncio.sleep(IN_FLIGHT_S)  # no event says the pushes left the daemon


def check(got: list[int], proxy: CutProxy, consumer: BrokerChannelLayer) -> None:
    """Every number of 0..COUNT-1 reached the application once, across reconnects."""
    lost = set(range(COUNT)) - set(got)
    twice = len(got) - len(set(got))
    print(
        f"connections {proxy.connections}, lost {len(lost)}, twice {twice},"
        f" redelivered and dropped by the layer {consumer.handed.redelivered}"
    )
    assert proxy.connections >= 2, "the consumer reconnected"
    assert not lost, f"{len(lost)} accepted messages lost: {sorted(lost)[:20]}"
    assert twice == 0, f"{twice} messages reached the application twice"


async def send_round(
    sender: BrokerChannelLayer, channel: str, numbers: range, how: str = "send"
) -> None:
    """Send each of ``numbers`` once, ``IN_FLIGHT`` at a time (``how``: ``send`` to a
    channel, or ``group_send`` to a group)."""
    slots = asyncio.Semaphore(IN_FLIGHT)
    send_one = sender.group_send if how == "group_send" else sender.send

    async def send(n: int) -> None:
        async with slots:
            await send_one(channel, {"n": n})

    await asyncio.gather(*(send(n) for n in numbers))


async def test_a_consumer_cut_off_gets_every_pushed_message_once(
    own_broker: BrokerProcess, unique: Callable[[str], str]
) -> None:
    """1. A consumer reaches the daemon through a proxy and receives on its own channel;
       a sender sends it 600 numbered messages through the daemon, 20 in flight, in
       rounds of 100; the consumer reads a little slower than that.
    2. After each round the proxy holds what the daemon writes to the consumer for a
       moment, then cuts the connection (the pushes in flight are lost on the wire);
       the consumer's layer reconnects through the proxy, with the same client id, while
       the next round is sent.
    3. Every message reaches the consumer's application exactly once.
    """
    proxy = CutProxy(own_broker.address)
    await proxy.start()
    consumer = BrokerChannelLayer(hosts=[proxy.url], capacity=COUNT)
    sender = BrokerChannelLayer(hosts=[own_broker.url], capacity=COUNT)
    channel = await consumer.new_channel(unique("pushed"))
    got: list[int] = []
    changed = asyncio.Event()
    reader = asyncio.create_task(read_all(consumer, channel, got, changed))
    try:
        for start in range(0, COUNT, ROUND):
            await send_round(sender, channel, range(start, start + ROUND))
            proxy.stall_replies()  # the last pushes of the round, and copies, pile up
            await asyncio.sleep(IN_FLIGHT_S)  # no event says the pushes left the daemon
            proxy.cut()  # what it held is gone
            proxy.resume()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECOVERY_TIMEOUT_S):
                while len(set(got)) < COUNT:
                    changed.clear()
                    await changed.wait()
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await consumer.close()
        await sender.close()
        await proxy.close()
    assert proxy.connections >= 3, "the consumer reconnected after the cuts"
    check(got, proxy, consumer)


#: How long the consumer may take to get everything once the killed daemon is back.
KILL_RECOVERY_S = 10.0
#: PostgreSQL: short leases and re-checks, so the restarted daemon takes the killed
#: one's pushes again about a second later.
POSTGRES_OPTIONS = "&lease=1&recheck_interval=0.2"


async def test_a_daemon_killed_with_pushes_in_flight_loses_none_on_redis(
    unique: Callable[[str], str],
) -> None:
    """1. A consumer receives on its own channel through daemon 1 (behind a proxy), a
       little slower than a sender sends to it through daemon 2, both on one Redis.
    2. After 150 sends the proxy holds what daemon 1 writes to the consumer; after 150
       more daemon 1 is killed (SIGKILL) with those pushes in flight, the proxy cuts them, and
       daemon 1 starts again; the consumer reconnects to it; 300 more are sent.
    3. Every message reaches the consumer's application exactly once.
    """
    await kill_with_pushes_in_flight(servers.backend_url("redis://"), unique, "send")


async def test_a_daemon_killed_with_stored_pushes_in_flight_loses_none_on_postgres(
    unique: Callable[[str], str],
) -> None:
    """As on Redis: the sender on daemon 2 stores each message in PostgreSQL, daemon 1
    takes it out for the consumer and pushes it; daemon 1 is killed with pushes in
    flight. What it pushed stays leased in PostgreSQL until acknowledged."""
    storage = servers.backend_url("postgresql://") + POSTGRES_OPTIONS
    await kill_with_pushes_in_flight(storage, unique, "send")


@pytest.mark.parametrize("how", ["send", "group_send"])
async def test_a_daemon_killed_with_direct_pushes_in_flight_loses_none_on_postgres(
    unique: Callable[[str], str], how: str
) -> None:
    """As above, but the sender is on daemon 1 too, without send windows: its sends
    (and group sends) to the consumer, connected to the same daemon with nothing
    waiting, are pushed directly (``docs/postgres.md``, *Direct pushes*); daemon 1 is
    killed with those in flight, and the sender reconnects to it too."""
    storage = servers.backend_url("postgresql://") + POSTGRES_OPTIONS
    await kill_with_pushes_in_flight(storage, unique, how, same_daemon=True)


async def test_a_daemon_killed_with_windowed_direct_pushes_in_flight_loses_none_on_postgres(
    unique: Callable[[str], str],
) -> None:
    """As above, with send windows (the default): the sender's windowed SENDs to the
    consumer, on the same daemon, are pushed directly too (``send_reserved_direct``:
    written leased to ``pushes`` in the commit that spends their room)."""
    storage = servers.backend_url("postgresql://") + POSTGRES_OPTIONS
    await kill_with_pushes_in_flight(storage, unique, "send", same_daemon=True, windows=True)


async def kill_with_pushes_in_flight(
    storage: str,
    unique: Callable[[str], str],
    how: str,
    *,
    same_daemon: bool = False,
    windows: bool = False,
) -> None:
    """The test above on ``storage``: the sender on daemon 2, or ``same_daemon`` on
    daemon 1 (without send windows unless ``windows``); ``how`` it sends: ``send`` or
    ``group_send`` (to a group of the consumer's channel only)."""
    extra = ("--send-window", "0") if same_daemon and not windows else ()
    pushing, sending = BrokerProcess(storage, extra_args=extra), BrokerProcess(storage)
    await asyncio.gather(asyncio.to_thread(pushing.start), asyncio.to_thread(sending.start))
    proxy = CutProxy(pushing.address)
    await proxy.start()
    consumer = BrokerChannelLayer(hosts=[proxy.url], capacity=COUNT)
    through = pushing if same_daemon else sending
    sender = BrokerChannelLayer(hosts=[through.url], capacity=COUNT)
    channel = await consumer.new_channel(unique("pushed"))
    target = channel
    if how == "group_send":
        target = unique("room")
        await consumer.group_add(target, channel)
    got: list[int] = []
    changed = asyncio.Event()
    reader = asyncio.create_task(read_all(consumer, channel, got, changed))
    try:
        await send_into_a_stall(sender, target, range(COUNT // 2), proxy, how)
        pushing.kill()
        proxy.cut()
        proxy.resume()
        await asyncio.to_thread(pushing.start)
        await send_round(sender, target, range(COUNT // 2, COUNT), how)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_RECOVERY_S):
                while len(set(got)) < COUNT:
                    changed.clear()
                    await changed.wait()
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await consumer.close()
        await sender.close()
        await proxy.close()
        await asyncio.gather(*(asyncio.to_thread(d.cleanup) for d in (pushing, sending)))
    check(got, proxy, consumer)
