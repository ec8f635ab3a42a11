"""Contract behaviours 7 (sync half), 20 and 21: one layer instance used from sync code.

These tests are plain functions: ``async_to_sync`` refuses to run inside a running
loop, and Django views, management commands and Celery tasks call it from sync code,
where each call runs in a fresh event loop of its own.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import async_to_sync

from tests.waits import DELIVERY_TIMEOUT_S, POLL_S, receive

GROUP_SENDS = 1000
#: Sockets a layer may legitimately keep open between calls (a pooled connection or two).
SOCKET_SLACK = 3


def test_normal_channel_keeps_fifo_order_through_async_to_sync(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 7: three sync sends, three sync receives, each in its own loop."""
    layer = make_layer()
    channel = unique("queue")
    for n in range(3):
        async_to_sync(layer.send)(channel, {"n": n})
    got = [async_to_sync(receive)(layer, channel)["n"] for _ in range(3)]
    assert got == [0, 1, 2]


def test_specific_channel_keeps_fifo_order_through_async_to_sync(
    make_layer: Any, loop_thread: Callable[[], Any]
) -> None:
    """Behaviour 7: a consumer on a server loop; a sync view sends to it three times.

    1. A long-lived loop (as in Daphne) makes a process-specific channel.
    2. The main thread sends three messages with ``async_to_sync``, on the same instance.
    3. The consumer receives them in order.
    """
    layer = make_layer()
    server = loop_thread()
    channel = server.run(layer.new_channel())
    for n in range(3):
        async_to_sync(layer.send)(channel, {"n": n})

    async def consume() -> list[int]:
        return [(await receive(layer, channel))["n"] for _ in range(3)]

    assert server.run(consume()) == [0, 1, 2]
    server.run(layer.close())


def test_receive_from_two_event_loops_on_one_instance(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 20.

    1. Two sync receives, one after the other (each makes its own loop).
    2. Two sync receives at once, from two threads (two loops alive together):
       each gets one of the two messages.
    """
    layer = make_layer()
    channel = unique("queue")
    async_to_sync(layer.send)(channel, {"n": 1})
    async_to_sync(layer.send)(channel, {"n": 2})
    assert async_to_sync(receive)(layer, channel) == {"n": 1}
    assert async_to_sync(receive)(layer, channel) == {"n": 2}

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(async_to_sync(receive), layer, channel) for _ in range(2)]
        async_to_sync(layer.send)(channel, {"n": 3})
        async_to_sync(layer.send)(channel, {"n": 4})
        got = sorted(future.result(DELIVERY_TIMEOUT_S * 2)["n"] for future in futures)
    assert got == [3, 4]


def test_specific_channel_made_in_one_loop_is_received_in_another(make_layer: Any) -> None:
    """Contract, Surface: one instance serves every loop of the process, channels_redis-style.

    ``new_channel``, ``send`` and ``receive`` each run in a different short-lived loop.
    """
    layer = make_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.send)(channel, {"n": 1})
    assert async_to_sync(receive)(layer, channel) == {"n": 1}


def _unclosed_event_loops() -> int:
    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        # type(), not isinstance(): a lazy object (Django settings) would set itself up
        if issubclass(type(obj), asyncio.AbstractEventLoop) and not obj.is_closed()
    )


def _wait_for_threads(baseline: int, timeout_s: float = 5.0) -> int:
    """``threading.active_count()`` once it is back to ``baseline`` or the time is up."""
    deadline = time.monotonic() + timeout_s
    while threading.active_count() > baseline and time.monotonic() < deadline:
        gc.collect()  # async_to_sync's executors end their thread when collected
        time.sleep(POLL_S)
    return threading.active_count()


def test_repeated_async_to_sync_group_send_does_not_accumulate_connections(
    make_layer: Any, unique: Callable[[str], str], open_sockets: Callable[[], int]
) -> None:
    """Behaviour 21.

    1. One warm-up round; note open sockets and unclosed loops (threads: before it).
    2. 1,000 ``async_to_sync(layer.group_send)`` calls, draining the member every 50.
    3. Every message arrived in order; sockets, threads and loops did not grow.
    """
    threads = _wait_for_threads(1, timeout_s=2.0)  # let earlier tests' threads end first
    layer = make_layer()
    member = unique("member")
    group = unique("room")
    async_to_sync(layer.group_add)(group, member)
    async_to_sync(layer.group_send)(group, {"n": -1})
    assert async_to_sync(receive)(layer, member) == {"n": -1}
    sockets, loops = open_sockets(), _unclosed_event_loops()

    async def drain(count: int) -> list[int]:
        return [(await receive(layer, member))["n"] for _ in range(count)]

    got: list[int] = []
    for n in range(GROUP_SENDS):
        async_to_sync(layer.group_send)(group, {"n": n})
        if n % 50 == 49:
            got += async_to_sync(drain)(50)
    assert got == list(range(GROUP_SENDS))
    assert open_sockets() <= sockets + SOCKET_SLACK, f"sockets: {sockets} -> {open_sockets()}"
    assert _wait_for_threads(threads) <= threads, "async_to_sync threads left running"
    assert _unclosed_event_loops() <= loops, "event loops left open"


def test_sync_group_sends_reach_a_channel_made_in_an_earlier_sync_call(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """1. One async_to_sync call makes a channel and adds it to a group.
    2. Three async_to_sync(group_send) calls, each on a loop of its own.
    3. A later async_to_sync call receives all three, in order: no loop that
       happened to get the channel's pushes dropped them when it closed."""
    layer = make_layer()
    group = unique("room")

    async def join() -> str:
        channel: str = await layer.new_channel()
        await layer.group_add(group, channel)
        return channel

    channel = async_to_sync(join)()
    for n in range(3):
        async_to_sync(layer.group_send)(group, {"n": n})

    async def read_three() -> list[int]:
        return [(await receive(layer, channel))["n"] for _ in range(3)]

    assert async_to_sync(read_three)() == [0, 1, 2]
