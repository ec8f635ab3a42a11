"""``broker.layer.sync``: blocking calls from plain sync code, on a real daemon (memory and
Redis), received by the async layer as its own sends would be.

Async tests run the sync calls in worker threads (``asyncio.to_thread``), as Django runs a
sync view beside a server's event loop; sync tests call them straight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from broker.layer import BrokerConnectionRefused, BrokerUnavailable, MessageTooLarge
from broker.layer.sync import SEND_MANY_BATCH, layer_for
from broker.layer.sync_calls import _batches
from protocol import with_message_id
from tests import servers
from tests.conftest import REPO_ROOT, BrokerProcess
from tests.layer.storage import storage_holds
from tests.waits import DELIVERY_TIMEOUT_S, IN_FLIGHT_S, assert_nothing_within, receive


@pytest.fixture(scope="module", params=["memory://", "redis://"], ids=["memory", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str:
    url: str = servers.backend_url(request.param)
    return url


def _local_port(sync: Any) -> int:
    """The local port of the calling thread's connection: which socket it is."""
    port: int = sync._local.conn.sock.getsockname()[1]
    return port


async def test_sync_sends_reach_async_consumers_as_equal_dicts(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """A send to a process-specific channel, a group_send, and a send to a normal
    channel, each from a thread with no event loop: the async layer receives each dict
    whole (bytes stay bytes, tuples arrive as lists)."""
    consumer, sender = make_layer(), make_layer()
    sync = layer_for(sender)
    channel, group, queue = await consumer.new_channel(), unique("group"), unique("queue")
    await asyncio.to_thread(sync.group_add, group, channel)
    message = {"type": "chat.message", "text": "héllo", "raw": b"\x00\xff", "n": (1, 2.5)}
    expected = {**message, "n": [1, 2.5]}
    await asyncio.to_thread(sync.send, channel, message)
    await asyncio.to_thread(sync.group_send, group, {**message, "via": "group"})
    await asyncio.to_thread(sync.send, queue, message)
    assert await receive(consumer, channel) == expected
    assert await receive(consumer, channel) == {**expected, "via": "group"}
    assert await receive(consumer, queue) == expected
    await asyncio.to_thread(sync.group_discard, group, channel)
    await asyncio.to_thread(sync.group_send, group, message)
    await assert_nothing_within(consumer, channel)


async def test_sync_and_async_layers_with_the_same_keys_exchange_encrypted_messages(
    make_layer: Any, unique: Callable[[str], str], backend_url: str
) -> None:
    """With ``symmetric_encryption_keys``, what the sync call stores is the async layer's
    ciphertext: the receiver decrypts it, and (Redis) storage never holds the text."""
    keys = ["a key this site has used for years"]
    consumer, sender = (
        make_layer(symmetric_encryption_keys=keys),
        make_layer(symmetric_encryption_keys=list(keys)),
    )
    queue, secret = unique("secret"), f"plaintext-{unique('s')}"
    await asyncio.to_thread(layer_for(sender).send, queue, {"type": "m", "text": secret})
    if backend_url.startswith("redis"):
        assert not await storage_holds(backend_url, secret.encode())
    assert await receive(consumer, queue) == {"type": "m", "text": secret}


def test_channel_full_and_capacity_patterns_are_the_layers(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    sync = layer_for(make_layer(capacity=2, channel_capacity={"tiny-*": 1}))
    queue, tiny = unique("queue"), unique("tiny")
    sync.send(queue, {"n": 1})
    sync.send(queue, {"n": 2})
    with pytest.raises(ChannelFull):
        sync.send(queue, {"n": 3})
    sync.send(tiny, {"n": 1})
    with pytest.raises(ChannelFull):
        sync.send(tiny, {"n": 2})


def test_bad_names_messages_and_sizes_are_refused_before_any_io(
    make_layer: Any, dead_url: str
) -> None:
    """Nothing listens at ``dead_url``: each refusal comes without trying to connect."""
    sync = layer_for(make_layer(hosts=[dead_url], connect_timeout=30))
    for name in ("¯\\_(ツ)_/¯", "chat" * 100, "=+135!", "a!b!c"):
        with pytest.raises(TypeError):
            sync.send(name, {"type": "x"})
        with pytest.raises(TypeError):
            sync.group_send(name, {"type": "x"})
        with pytest.raises(TypeError):
            sync.send_many([("fine", {"type": "x"}), (name, {"type": "x"})])
    with pytest.raises(TypeError):
        sync.send("fine", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserved"):
        sync.group_send("fine", {"__asgi_channel__": "x"})


def test_a_message_over_the_limit_raises_and_the_connection_goes_on(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    layer = make_layer(max_message_bytes=1000)
    sync, queue = layer_for(layer), unique("queue")
    sync.send(queue, {"n": 1})
    port = _local_port(sync)
    with pytest.raises(MessageTooLarge):
        sync.send(queue, {"blob": b"x" * 2000})
    with pytest.raises(MessageTooLarge):
        sync.send_many([(queue, {"n": 2}), (queue, {"blob": b"x" * 2000})])
    sync.send(queue, {"n": 3})
    assert _local_port(sync) == port
    assert [receive_sync(layer, queue)["n"] for _ in range(2)] == [1, 3]


def receive_sync(layer: Any, channel: str) -> dict[str, Any]:
    from asgiref.sync import async_to_sync

    message: dict[str, Any] = async_to_sync(receive)(layer, channel)
    return message


def test_send_many_keeps_order_and_returns_the_indexes_refused_as_full(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """More messages than one SEND_MANY frame takes, to two channels: one with room for
    all, one with room for three. The refused indexes are exactly the full one's last."""
    layer = make_layer(capacity=3, channel_capacity={"big-*": 1000})
    sync, big, small = layer_for(layer), unique("big"), unique("small")
    count = SEND_MANY_BATCH + 40
    messages = [(big, {"n": n}) for n in range(count)]
    messages[10:10] = [(small, {"n": n}) for n in range(5)]
    refused = sync.send_many(messages)
    assert refused == [13, 14]
    assert [receive_sync(layer, small)["n"] for _ in range(3)] == [0, 1, 2]
    assert [receive_sync(layer, big)["n"] for _ in range(count)] == list(range(count))


def test_send_many_batches_by_count_and_by_bytes() -> None:
    payloads = [("c", b"x" * 100) for _ in range(SEND_MANY_BATCH * 2 + 1)]
    assert [(start, len(batch)) for start, batch in _batches(payloads, 1 << 30)] == [
        (0, SEND_MANY_BATCH),
        (SEND_MANY_BATCH, SEND_MANY_BATCH),
        (SEND_MANY_BATCH * 2, 1),
    ]
    big = [("c", b"x" * 3000) for _ in range(5)]
    assert [(start, len(batch)) for start, batch in _batches(big, 4096 + 6100)] == [
        (0, 2),
        (2, 2),
        (4, 1),
    ]


def test_each_thread_sends_on_its_own_connection(
    make_layer: Any, unique: Callable[[str], str], open_sockets: Callable[[], int]
) -> None:
    """Eight threads send at once through one layer: every message arrives once, each
    thread used a connection of its own, and none is left open once they end."""
    layer = make_layer(capacity=1000)
    sync, queue = layer_for(layer), unique("queue")
    ports: list[int] = []
    start = threading.Barrier(8)

    def work(thread: int) -> None:
        start.wait()
        for n in range(25):
            sync.send(queue, {"id": f"{thread}-{n}"})
        ports.append(_local_port(sync))

    threads = [threading.Thread(target=work, args=(index,)) for index in range(8)]
    before = open_sockets()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DELIVERY_TIMEOUT_S * 2)
    assert len(set(ports)) == 8
    assert open_sockets() == before
    got = sorted(receive_sync(layer, queue)["id"] for _ in range(200))
    assert got == sorted(f"{thread}-{n}" for thread in range(8) for n in range(25))


def _send_from_child(sync: Any, channel: str, ports: Any) -> None:
    sync.send(channel, {"from": "child"})
    ports.put(_local_port(sync))


def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """1. The parent sends (its thread's connection opens).  2. A child made by fork
    (multiprocessing's fork start method, as Celery's prefork pool) sends through the
    same object: on a connection of its own.  3. The parent sends again on its own
    connection, which the child's exit did not close.  All three arrive, in order."""
    layer = make_layer()
    sync, queue = layer_for(layer), unique("queue")
    sync.send(queue, {"from": "parent"})
    parent_port = _local_port(sync)
    context = multiprocessing.get_context("fork")
    ports = context.SimpleQueue()
    child = context.Process(target=_send_from_child, args=(sync, queue, ports))
    child.start()
    child.join(DELIVERY_TIMEOUT_S * 2)
    assert child.exitcode == 0
    assert ports.get() != parent_port
    sync.send(queue, {"from": "parent again"})
    assert _local_port(sync) == parent_port
    got = [receive_sync(layer, queue)["from"] for _ in range(3)]
    assert got == ["parent", "child", "parent again"]


def test_a_call_after_a_daemon_restart_connects_afresh(
    make_own_layer: Any, own_broker: BrokerProcess, unique: Callable[[str], str]
) -> None:
    """The idle connection was closed by the restart: the next call finds out before
    writing to it, and opens another instead of raising."""
    layer = make_own_layer()
    sync, queue = layer_for(layer), unique("queue")
    sync.send(queue, {"n": 1})
    port = _local_port(sync)
    own_broker.restart()
    sync.send(queue, {"n": 2})
    assert _local_port(sync) != port
    assert receive_sync(layer, queue)["n"] in (1, 2)  # memory:// forgot the first


def test_no_daemon_is_reported_at_once_naming_the_host(make_layer: Any, dead_url: str) -> None:
    """As the layer's own calls: a refused connection is raised at once (a view must not
    hang for ``connect_timeout``), as ``BrokerConnectionRefused``, with the command
    that would listen there."""
    sync = layer_for(make_layer(hosts=[dead_url], connect_timeout=30))
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(BrokerConnectionRefused) as failed:
            sync.group_send("nobody-home", {"type": "x"})
        assert time.monotonic() - started < 1.0
    port = dead_url.rsplit(":", 1)[1]
    assert f"connection refused at {dead_url}" in str(failed.value)
    assert f"channels-broker serve --listen 127.0.0.1:{port}" in str(failed.value)


def test_a_host_that_is_not_a_broker_is_named(make_layer: Any) -> None:
    """Something else listens there and speaks first (an SSH server's banner)."""
    with socket.create_server(("127.0.0.1", 0)) as server:

        def greet() -> None:
            with contextlib.suppress(OSError):  # the server shut down: the test is over
                while True:
                    conn, _ = server.accept()
                    with conn:
                        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        thread = threading.Thread(target=greet, daemon=True)
        thread.start()
        host = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        sync = layer_for(make_layer(hosts=[host], connect_timeout=0.3))
        with pytest.raises(BrokerUnavailable, match="not a channels-broker daemon"):
            sync.send("anything", {"type": "x"})
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept (Linux)
    thread.join(DELIVERY_TIMEOUT_S)
    assert not thread.is_alive()


def test_calls_fail_over_to_the_host_that_answers(
    make_layer: Any, broker: BrokerProcess, dead_url: str, unique: Callable[[str], str]
) -> None:
    """One host of two is down: every call, from fresh connections, gets through."""
    layer = make_layer(hosts=[dead_url, broker.url])
    sync, queue = layer_for(layer), unique("queue")
    for n in range(6):
        sync.send(queue, {"n": n})
        sync.close()
    assert [receive_sync(layer, queue)["n"] for _ in range(6)] == list(range(6))


def test_a_wrong_token_is_refused_at_once(
    broker_factory: Callable[..., BrokerProcess], make_layer: Any
) -> None:
    daemon = broker_factory(token="the-right-one")
    sync = layer_for(make_layer(hosts=[daemon.url], token="a-wrong-one", connect_timeout=30))
    started = time.monotonic()
    with pytest.raises(PermissionError, match="refused the token"):
        sync.send("anything", {"type": "x"})
    assert time.monotonic() - started < 5


def test_a_unix_socket_host_is_served(
    broker_factory: Callable[..., BrokerProcess],
    make_layer: Any,
    tmp_path: Any,
    unique: Callable[[str], str],
) -> None:
    path = f"{tmp_path}/broker.sock"
    daemon = broker_factory(unix_path=path)
    sync_layer, reader = make_layer(hosts=[f"unix://{path}"]), make_layer(hosts=[daemon.url])
    queue = unique("queue")
    layer_for(sync_layer).send(queue, {"over": "unix"})
    assert receive_sync(reader, queue) == {"over": "unix"}


#: A Django process: CHANNEL_LAYERS has our layer as "default" (prefix "siteb") and
#: Channels' in-memory layer as "memory". It sends through both, and names an alias
#: that is not there; it prints what it met, as JSON.
_DJANGO_SCRIPT = """
import json, sys
from django.conf import settings
settings.configure(CHANNEL_LAYERS={
    "default": {"BACKEND": "broker.layer.BrokerChannelLayer",
                "CONFIG": {"hosts": [sys.argv[1]], "prefix": "siteb"}},
    "memory": {"BACKEND": "channels.layers.InMemoryChannelLayer"},
})
import asyncio
import contextlib
from asgiref.sync import async_to_sync
from channels.exceptions import InvalidChannelLayerError
from channels.layers import get_channel_layer
from broker.layer import sync

queue, group = sys.argv[2], sys.argv[3]
sync.send(queue, {"n": 1})
sync.group_add(group, queue)
sync.group_send(group, {"n": 2})
sync.send("mem", {"n": 3}, alias="memory")
memory = get_channel_layer("memory")
received = async_to_sync(asyncio.wait_for)(memory.receive("mem"), 5)
try:
    sync.send(queue, {"n": 4}, alias="nope")
except InvalidChannelLayerError as exc:
    unknown = str(exc)
print(json.dumps({"memory": received, "unknown": unknown}))
"""


@pytest.mark.backends("memory")
def test_calls_take_the_layer_of_channel_layers_by_alias(
    broker: BrokerProcess, make_layer: Any, unique: Callable[[str], str]
) -> None:
    """In a Django process the calls use ``CHANNEL_LAYERS[alias]``: our layer with its
    settings (here its prefix), Channels' in-memory layer through ``async_to_sync``, and
    an alias that is not there is named."""
    queue, group = unique("queue"), unique("group")
    result = subprocess.run(
        [sys.executable, "-c", _DJANGO_SCRIPT, broker.url, queue, group],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "memory": {"n": 3},
        "unknown": "CHANNEL_LAYERS has no 'nope' layer",
    }
    same_site = make_layer(prefix="siteb")
    assert [receive_sync(same_site, queue)["n"] for _ in range(2)] == [1, 2]


async def test_a_call_from_a_thread_running_an_event_loop_is_refused(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """It would block the loop for a round trip, or for ``connect_timeout``;
    ``async_to_sync`` refuses the same, and the answer is to await the layer."""
    sync = layer_for(make_layer())
    with pytest.raises(RuntimeError, match="await the layer's own methods"):
        sync.send(unique("queue"), {"type": "x"})


class _Interrupted(BaseException):
    """What a Celery time limit or a KeyboardInterrupt does to a call: not an Exception."""


@pytest.mark.backends("memory")
def test_a_call_interrupted_while_waiting_leaves_no_connection_out_of_step(
    make_own_layer: Any, own_broker: BrokerProcess, unique: Callable[[str], str]
) -> None:
    """1. The daemon is stopped (SIGSTOP), so a send waits for its answer.  2. A signal
    interrupts it.  3. Once the daemon runs again, the next call is on a new connection,
    and both messages arrive (the interrupted one had been written whole)."""
    layer = make_own_layer()
    sync, queue = layer_for(layer), unique("queue")
    sync.send(queue, {"n": 0})
    port = _local_port(sync)

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    assert own_broker.process is not None
    own_broker.process.send_signal(signal.SIGSTOP)
    try:
        timer = threading.Timer(IN_FLIGHT_S, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        with pytest.raises(_Interrupted):
            sync.send(queue, {"n": 1})
        timer.join()
    finally:
        own_broker.process.send_signal(signal.SIGCONT)
        signal.signal(signal.SIGUSR1, previous)
    sync.send(queue, {"n": 2})
    assert _local_port(sync) != port
    assert sorted(receive_sync(layer, queue)["n"] for _ in range(3)) == [0, 1, 2]


@pytest.mark.backends("shared")
def test_sync_sends_carry_message_ids_as_the_layers_do(
    make_layer: Any, unique: Callable[[str], str], backend_url: str
) -> None:
    """Each payload starts with (sender, seq) of the thread's connection, numbered from
    1 as the event-loop client numbers its own: a receiving layer drops a redelivery."""
    layer = make_layer()
    sync, queue = layer_for(layer), unique("queue")
    sync.send(queue, {"n": 1})
    sync.send_many([(queue, {"n": 2}), (queue, {"n": 3})])
    sender = sync._local.conn.sender
    for seq in (1, 2, 3):
        assert asyncio.run(storage_holds(backend_url, with_message_id(sender, seq, b"")))
    assert [receive_sync(layer, queue)["n"] for _ in range(3)] == [1, 2, 3]


#: How long the daemon is away in the restart test: well within connect_timeout.
RESTART_S = 0.5
#: The restart test's connect_timeout: room for a daemon to start on a loaded machine.
RESTART_TIMEOUT_S = 3.0


@pytest.mark.backends("memory")
def test_a_call_during_a_restart_waits_for_the_daemon(
    make_own_layer: Any, own_broker: BrokerProcess, unique: Callable[[str], str]
) -> None:
    """1. The thread's connection opens, and stays idle longer than connect_timeout (so
    the connect is no longer the last sign of life).  2. The daemon is killed, and started
    again 0.5 s later.  3. A send made just after the kill finds the idle connection
    closed, so the daemon was alive a moment ago (a restart): the send waits for it and
    is accepted, as the layer's own send would be, instead of raising at once."""
    layer = make_own_layer(connect_timeout=RESTART_TIMEOUT_S)
    sync, queue = layer_for(layer), unique("queue")
    sync.send(queue, {"n": 0})
    time.sleep(RESTART_TIMEOUT_S + 0.2)  # the behaviour on trial is the passing time
    own_broker.kill()
    back = threading.Timer(RESTART_S, own_broker.start)
    back.start()
    try:
        started = time.monotonic()
        sync.send(queue, {"n": 1})
        assert RESTART_S <= time.monotonic() - started < RESTART_TIMEOUT_S
    finally:
        back.join()
    assert receive_sync(layer, queue) == {"n": 1}  # memory://: {"n": 0} went with it
