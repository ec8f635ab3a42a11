"""Redis: group messages fanned out at the edge survive a cut connection and a killed
daemon, counting every message: none accepted is lost, none reaches the application
twice (issue 17 item 2 with issue 15).

A group_send to members whose owner is attached to the sending daemon goes out as one
PUSH per owning connection, and Redis keeps one leased record of it per owner until the
layer's ACK covers it (``backends.redis.edge``). A connection that closes first hands it
back (stored for each member); a daemon killed outright leaves it to lapse, and the
owner's next connection stores it for each member then. The layer drops a copy of a
message it handed to ``receive`` already.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from broker.layer import BrokerChannelLayer
from tests import servers
from tests.broker.daemon.test_pushed_faults import KILL_RECOVERY_S, read_all
from tests.broker.samples import scrape, value
from tests.conftest import BrokerProcess
from tests.proxy import CutProxy
from tests.waits import IN_FLIGHT_S

pytestmark = pytest.mark.backends("redis")

COUNT = 600
DELIVERED = "channels_broker_messages_delivered_total"


async def group_round(sender: BrokerChannelLayer, group: str, numbers: range) -> None:
    for n in numbers:
        await sender.group_send(group, {"n": n})


async def wait_for_all(got: list[int], changed: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(KILL_RECOVERY_S):
            while len(set(got)) < COUNT:
                changed.clear()
                await changed.wait()


def check(got: list[int], proxy: CutProxy) -> None:
    lost = set(range(COUNT)) - set(got)
    twice = len(got) - len(set(got))
    print(f"connections {proxy.connections}, lost {len(lost)}, twice {twice}")
    assert proxy.connections >= 2, "the consumer reconnected"
    assert not lost, f"{len(lost)} accepted messages lost: {sorted(lost)[:20]}"
    assert twice == 0, f"{twice} messages reached the application twice"


async def fault_round(
    sending: BrokerProcess, owning: BrokerProcess, fault: str, group: str
) -> tuple[list[int], CutProxy, float]:
    """The consumer on ``owning`` through a proxy, the sender on ``sending``: 150 group
    sends, 150 more with the consumer's replies held, then the fault ("cut", or "kill":
    ``owning`` SIGKILLed and started again), then 300 more. Returns what the consumer's
    application got, the proxy (for ``check``), and ``owning``'s edge deliveries."""
    proxy = CutProxy(owning.address)
    await proxy.start()
    consumer = BrokerChannelLayer(hosts=[proxy.url], capacity=COUNT)
    sender = BrokerChannelLayer(hosts=[sending.url], capacity=COUNT)
    channel, other = await consumer.new_channel(), await consumer.new_channel()
    for member in (channel, other):
        await consumer.group_add(group, member)
    got: list[int] = []
    changed = asyncio.Event()
    reader = asyncio.create_task(read_all(consumer, channel, got, changed))
    try:
        await group_round(sender, group, range(COUNT // 4))
        proxy.stall_replies()
        await group_round(sender, group, range(COUNT // 4, COUNT // 2))
        await asyncio.sleep(IN_FLIGHT_S)  # no event says the pushes left the daemon
        if fault == "kill":
            owning.kill()
        proxy.cut()
        proxy.resume()
        if fault == "kill":
            await asyncio.to_thread(owning.start)
        await group_round(sender, group, range(COUNT // 2, COUNT))
        await wait_for_all(got, changed)
        edge = value(await asyncio.to_thread(scrape, owning), DELIVERED, mode="edge")
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await consumer.close()
        await sender.close()
        await proxy.close()
    return got, proxy, edge


@pytest.mark.parametrize("fault", ["cut", "kill"])
async def test_fan_outs_in_flight_are_neither_lost_nor_doubled(
    fault: str, unique: Callable[[str], str]
) -> None:
    """1. A consumer (behind a proxy) and a sender share one daemon on Redis; the
       consumer's two channels are a group's members, so each group_send is a fan-out.
    2. After 150 group_sends the proxy holds what the daemon writes to the consumer;
       after 150 more the proxy cuts the consumer off ("cut"), or the daemon is killed
       with SIGKILL and started again ("kill"); 300 more are sent.
    3. Every message reaches the consumer's application exactly once, and fan-outs went
       at the edge.
    """
    daemon = BrokerProcess(servers.backend_url("redis://"))
    await asyncio.to_thread(daemon.start)
    try:
        got, proxy, edge = await fault_round(daemon, daemon, fault, unique("room"))
    finally:
        await asyncio.to_thread(daemon.cleanup)
    check(got, proxy)
    assert edge > 0, "group messages went at the edge"
