"""A take for a push whose answer was lost keeps its channel in order (issue 15).

A daemon takes a consumer's messages out of Redis for a push in one script, which
leases them to it (``backends.redis.pushed``). If the answer never arrives (the command
timed out: Redis, the network or the daemon stalled; a Redis Cluster failover), the
script may have run: its messages are leased under a token the daemon holds no
messages of. The daemon takes the channel again once Redis answers, and the newer
messages it pushes then must not overtake those: once they came back when the lease
lapsed, a lease later, after newer ones (seen in a Cluster failover under load).

A send that grabs its message back for its owner here (``PUSH``) is such a take too.
There the sender's layer sends the message again, with its id, and the copy that comes
back is dropped: the "grab" case checks that the channel's next take gives the grabbed
one back, and that nothing comes twice.

PostgreSQL likewise: a ``push_take`` whose answer was lost may have committed, leasing
its messages to the daemon (``backends.postgres.pushed``); they stayed leased, renewed
with the daemon's others, while newer ones were pushed. There the proxy holds the
answers from the moment a statement naming the consumer's channel goes up: once the
consumer has everything before, that is the daemon's take for the push.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from backends.redis.pushed_scripts import TAKE_HELD
from backends.redis.scripts import PUSH
from broker.layer import BrokerChannelLayer
from tests import pg_server, servers
from tests.broker.daemon.test_faults import through
from tests.broker.daemon.traffic import Readers, assert_once_in_order, send_until_accepted
from tests.conftest import BrokerProcess
from tests.proxy import CutProxy
from tests.waits import DELIVERY_TIMEOUT_S

#: The pushing daemon's per-command deadline (the ``timeout`` URL option).
TIMEOUT_S = 1.0
#: How long Redis's answers are held: past the deadline, so the daemon's connection fails.
HELD_S = 1.5
#: Messages sent before the fault, and after it: those after span more than a lease
#: (5 s, the default), in which a take left leased would come back among them.
BEFORE = 10
AFTER = 130
SEND_INTERVAL_S = 0.05


@pytest.fixture
def storage_url(storage: str) -> str:
    """The storage's URL, resolved outside the test's event loop: it may start a server."""
    if storage == "postgresql":
        return pg_server.backend_url("postgresql://")
    return servers.backend_url("redis://")


@pytest.mark.parametrize(
    ("storage", "how"), [("redis", "take"), ("redis", "grab"), ("postgresql", "take")]
)
async def test_a_push_whose_answer_was_lost_keeps_its_channel_in_order(
    storage: str, how: str, storage_url: str, unique: Callable[[str], str]
) -> None:
    """1. A consumer receives on its own channel through daemon 1, which reaches its
       storage (Redis, PostgreSQL) through a proxy. "take": a sender sends numbered
       messages through daemon 2, and daemon 1 takes them out of storage for the push.
       "grab" (Redis): the sender is on daemon 1 too, without send windows, so each
       send grabs its message back for the push in the same script.
    2. The proxy holds what storage answers from the moment daemon 1 takes (or grabs)
       for a push: the take runs, its answer waits past the daemon's deadline, and the
       daemon drops that connection; then storage answers again.
    3. The sender goes on for more than a lease: every message reaches the consumer
       once (a send the sender retried may come twice, in a row), and in order.
    """
    parts = urlsplit(storage_url)
    proxy = CutProxy((parts.hostname or "", parts.port or 0))
    await proxy.start()
    extra = ("--send-window", "0") if how == "grab" else ()
    pushing = BrokerProcess(
        f"{through(storage_url, proxy.port)}&timeout={TIMEOUT_S}", extra_args=extra
    )
    sending = BrokerProcess(storage_url) if how == "take" else pushing
    daemons = list(dict.fromkeys((pushing, sending)))
    await asyncio.gather(*(asyncio.to_thread(d.start) for d in daemons))
    consumer = BrokerChannelLayer(hosts=[pushing.url], capacity=1000)
    sender = BrokerChannelLayer(hosts=[sending.url], capacity=1000)
    count = BEFORE + 1 + AFTER
    try:
        channel = await consumer.new_channel(unique("pushed"))
        async with Readers([(consumer, channel)]) as readers:
            for n in range(BEFORE):
                await send_until_accepted(sender, channel, {"n": n})
            await readers.wait_for_all(BEFORE)  # and their ACKs written meanwhile: quiet
            marker = (TAKE_HELD if how == "take" else PUSH).sha.encode()
            proxy.stall_replies_after(channel.encode() if storage == "postgresql" else marker)
            meets_it = asyncio.create_task(send_until_accepted(sender, channel, {"n": BEFORE}))
            await asyncio.wait_for(proxy.stalled.wait(), DELIVERY_TIMEOUT_S)
            await asyncio.sleep(HELD_S)  # the fault lasts this long
            proxy.resume()
            retried = {BEFORE} if await meets_it else set()
            for n in range(BEFORE + 1, count):
                await send_until_accepted(sender, channel, {"n": n})
                await asyncio.sleep(SEND_INTERVAL_S)
            await readers.wait_for_all(count)
        assert_once_in_order(readers.got[channel], count, retried)
    finally:
        await consumer.close()
        await sender.close()
        # The daemons first: one whose storage is gone (the proxy) may not stop in time.
        await asyncio.gather(*(asyncio.to_thread(d.cleanup) for d in daemons))
        await proxy.close()


pytestmark = pytest.mark.timeout(120)
