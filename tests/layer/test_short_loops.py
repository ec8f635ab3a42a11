"""``async_to_sync(layer.group_send)`` and ``async_to_sync(layer.send)`` from sync code
(``broker.layer.short_loops``): the call goes on a blocking connection kept for the
calling thread, not on a connection of the loop asgiref makes for that one call, so a
group send returns once written and nothing waits for the loop to settle as it closes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync

from tests.conftest import LayerFactory
from tests.proxy import CutProxy
from tests.waits import receive

pytestmark = pytest.mark.backends("memory", "redis", "postgresql")

#: Group sends made while every reply from the daemon is held.
HELD_SENDS = 20
#: The layer's connect_timeout: how long a loop that settles at close would wait for a
#: held reply, per call.
CONNECT_TIMEOUT_S = 10.0
#: The held group sends all return well within one such wait.
RETURN_WITHIN_S = 3.0
THREADS = 4
SENDS_PER_THREAD = 50


async def test_sync_group_sends_return_while_the_daemons_replies_are_held(
    broker: Any, make_layer: LayerFactory, unique: Any
) -> None:
    """1. A member joins a group; a sender layer goes through a proxy.
    2. One ``async_to_sync(group_send)`` connects (its WELCOME comes through).
    3. The proxy holds every reply from the daemon; 20 more calls from a plain thread
       all return within 3 s (a loop connection would wait up to connect_timeout, 10 s,
       for a PONG at each loop's close).
    4. Replies flow again: the member gets all 21, once each, in order."""
    proxy = CutProxy(broker.address)
    await proxy.start()
    try:
        sender = make_layer(hosts=[proxy.url], connect_timeout=CONNECT_TIMEOUT_S)
        member = make_layer()
        group, channel = unique("short"), await member.new_channel()
        await member.group_add(group, channel)

        def send_all() -> None:
            async_to_sync(sender.group_send)(group, {"type": "n", "n": 0})
            proxy.stall_replies()
            for n in range(1, HELD_SENDS + 1):
                async_to_sync(sender.group_send)(group, {"type": "n", "n": n})

        started = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(send_all), RETURN_WITHIN_S + CONNECT_TIMEOUT_S)
        assert time.monotonic() - started < RETURN_WITHIN_S
        proxy.resume()
        got = [(await receive(member, channel))["n"] for _ in range(HELD_SENDS + 1)]
        assert got == list(range(HELD_SENDS + 1))
        await sender.close()
        await member.close()
    finally:
        await proxy.close()


async def test_each_calling_threads_sends_arrive_in_its_order(
    make_layer: LayerFactory, unique: Any
) -> None:
    """1. Four plain threads each make 50 ``async_to_sync`` calls to one channel,
       alternating ``send`` and ``group_send`` (the channel is the group's member).
    2. The consumer gets all 200, once each, and each thread's in the order it sent."""
    sender, consumer = make_layer(), make_layer()
    group, channel = unique("threads"), await consumer.new_channel()
    await consumer.group_add(group, channel)

    def sends(thread: int) -> None:
        for n in range(SENDS_PER_THREAD):
            message = {"type": "n", "thread": thread, "n": n}
            if n % 2:
                async_to_sync(sender.group_send)(group, message)
            else:
                async_to_sync(sender.send)(channel, message)

    threads = [threading.Thread(target=sends, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    got = [await receive(consumer, channel) for _ in range(THREADS * SENDS_PER_THREAD)]
    await asyncio.to_thread(lambda: [thread.join() for thread in threads])
    for index in range(THREADS):
        assert [m["n"] for m in got if m["thread"] == index] == list(range(SENDS_PER_THREAD))
    await sender.close()
    await consumer.close()
