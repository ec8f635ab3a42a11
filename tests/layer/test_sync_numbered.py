"""``broker.layer.sync``'s numbered group sends (docs/flow.md, *Numbered group sends*):
written without waiting for an answer, within the bound; safe under threads and after
``fork()``; sent again after a reconnect and delivered once.

Async tests run the sync calls in worker threads (``asyncio.to_thread``), beside the
test's event loop, which runs the proxy and the receiving layer.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

from broker.layer.sync import layer_for
from protocol import MAX_UNCONFIRMED_GROUP_SENDS
from tests.conftest import BrokerProcess
from tests.layer.test_sync import receive_sync
from tests.proxy import CutProxy
from tests.waits import DELIVERY_TIMEOUT_S, RECOVERY_TIMEOUT_S, assert_nothing_within, receive

pytestmark = pytest.mark.backends("memory", "redis", "postgresql")

THREADS = 8
PER_THREAD = 200
#: Seconds a group send past the bound must keep waiting (the daemon is stopped).
STILL_WAITING_S = 0.5


def _port(sync: Any) -> int:
    port: int = sync._local.conn.sock.getsockname()[1]
    return port


async def _receive_all(member: Any, channel: str, count: int) -> list[Any]:
    got = [await receive(member, channel) for _ in range(count)]
    await assert_nothing_within(member, channel)
    assert member.handed.redelivered == 0  # the daemon delivered no second copy
    return got


async def test_group_sends_from_threads_each_arrive_once(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Eight threads group_send at once through one layer, each on its own connection
    and numbers: the member gets every message once, and each thread's in order."""
    sender, member = make_layer(capacity=THREADS * PER_THREAD), make_layer()
    sync, group = layer_for(sender), unique("threads")
    channel = await member.new_channel()
    await member.group_add(group, channel)
    start = threading.Barrier(THREADS)

    def work(thread: int) -> None:
        start.wait()
        for n in range(PER_THREAD):
            sync.group_send(group, {"t": thread, "n": n})
        sync.close()

    # Threads of their own: the default executor may have fewer workers than the barrier.
    threads = [threading.Thread(target=work, args=(thread,)) for thread in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        await asyncio.to_thread(thread.join, RECOVERY_TIMEOUT_S)
    got = await _receive_all(member, channel, THREADS * PER_THREAD)
    for thread in range(THREADS):
        assert [m["n"] for m in got if m["t"] == thread] == list(range(PER_THREAD))


async def test_group_sends_unconfirmed_at_a_cut_are_sent_again_and_arrive_once(
    broker: Any, make_layer: Any, unique: Callable[[str], str]
) -> None:
    """1. A thread group_sends through a proxy that holds the daemon's replies: the
       group sends are delivered, their CONFIRMs not read.
    2. The proxy cuts the connection; the thread's next call opens another and sends
       again what was unconfirmed, with the same seqs.
    3. The member gets each once: the daemon delivered none twice."""
    proxy = CutProxy(broker.address)
    await proxy.start()
    loop = asyncio.get_running_loop()
    try:
        sender, member = make_layer(hosts=[proxy.url], capacity=1000), make_layer()
        sync, group = layer_for(sender), unique("cut")
        channel = await member.new_channel()
        await member.group_add(group, channel)
        delivered = threading.Event()

        def on_loop(action: Callable[[], None]) -> None:  # proxy calls, from the thread
            asyncio.run_coroutine_threadsafe(_run(action), loop).result(DELIVERY_TIMEOUT_S)

        def work() -> None:  # one thread: its calls share one connection and numbers
            sync.group_send(group, {"n": 0})  # connected: numbering agreed
            on_loop(proxy.stall_replies)
            for n in range(1, 100):
                sync.group_send(group, {"n": n})
            assert delivered.wait(DELIVERY_TIMEOUT_S)
            on_loop(lambda: (proxy.cut(), proxy.resume()))
            sync.group_send(group, {"n": 100})
            sync.close()

        working = asyncio.create_task(asyncio.to_thread(work))
        assert [(await receive(member, channel))["n"] for _ in range(100)] == list(range(100))
        delivered.set()
        await asyncio.wait_for(working, RECOVERY_TIMEOUT_S)
        assert [m["n"] for m in await _receive_all(member, channel, 1)] == [100]
        assert proxy.connections == 2
    finally:
        await proxy.close()


async def _run(action: Callable[[], Any]) -> None:
    action()


@pytest.mark.backends("memory")
def test_group_send_waits_only_past_the_bound(
    make_own_layer: Any, own_broker: BrokerProcess, unique: Callable[[str], str]
) -> None:
    """1. The daemon is stopped (SIGSTOP): nothing is answered.
    2. ``MAX_UNCONFIRMED_GROUP_SENDS`` group sends return all the same.
    3. The next one waits until the daemon runs again (SIGCONT), then returns."""
    layer = make_own_layer(capacity=MAX_UNCONFIRMED_GROUP_SENDS + 1)
    sync, group = layer_for(layer), unique("bound")
    connected, stopped, done = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:  # one thread: its calls share one connection
        sync.group_add(group, "bounded-queue")
        connected.set()
        stopped.wait()
        for n in range(MAX_UNCONFIRMED_GROUP_SENDS + 1):
            sync.group_send(group, {"n": n})
            if n == MAX_UNCONFIRMED_GROUP_SENDS - 1:
                done.set()
        sync.close()

    thread = threading.Thread(target=work)
    thread.start()
    assert connected.wait(DELIVERY_TIMEOUT_S)
    assert own_broker.process is not None
    own_broker.process.send_signal(signal.SIGSTOP)
    try:
        stopped.set()
        assert done.wait(DELIVERY_TIMEOUT_S), "group sends within the bound waited"
        thread.join(STILL_WAITING_S)
        assert thread.is_alive(), "a group send past the bound returned unanswered"
    finally:
        own_broker.process.send_signal(signal.SIGCONT)
    thread.join(RECOVERY_TIMEOUT_S)
    assert not thread.is_alive()


def _group_send_from_child(sync: Any, group: str, ports: Any) -> None:
    for n in range(50):
        sync.group_send(group, {"from": "child", "n": n})
    ports.put(_port(sync))
    sync.close()


def test_a_forked_child_numbers_its_own_and_leaves_the_parents(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """1. The parent group_sends (some unconfirmed when it forks: CONFIRMs are read as
    calls come). 2. A forked child (multiprocessing's fork start method, as Celery's
    prefork pool) group_sends through the same object: on its own connection and id,
    sending nothing of its parent's again. 3. The parent goes on, on the connection
    it had (a child that said HELLO with its id would have taken it over).
    Everything arrives once, each sender's in order."""
    sender, reader = make_layer(capacity=500), make_layer()
    sync, group, queue = layer_for(sender), unique("fork"), unique("queue")
    sync.group_add(group, queue)
    for n in range(50):
        sync.group_send(group, {"from": "parent", "n": n})
    parent_port = _port(sync)
    context = multiprocessing.get_context("fork")
    ports = context.SimpleQueue()
    child = context.Process(target=_group_send_from_child, args=(sync, group, ports))
    child.start()
    child.join(DELIVERY_TIMEOUT_S * 2)
    assert child.exitcode == 0
    for n in range(50, 100):
        sync.group_send(group, {"from": "parent", "n": n})
    assert _port(sync) == parent_port
    assert ports.get() != parent_port
    sync.close()
    got = [receive_sync(reader, queue) for _ in range(150)]
    assert reader.handed.redelivered == 0
    assert [m["n"] for m in got if m["from"] == "parent"] == list(range(100))
    assert [m["n"] for m in got if m["from"] == "child"] == list(range(50))
