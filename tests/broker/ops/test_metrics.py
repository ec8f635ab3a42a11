"""``/metrics`` after known traffic shows exactly the counts that traffic implies.

Each test runs a daemon of its own (``own_broker``), so its counters start at zero
and every figure below is exact. Backend gauges (waiting messages, groups) are exact
on ``memory://`` only: a shared storage's gauges also see other tests' data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from protocol import Error, ErrorCode, Ok, SendMany, Welcome, encode_frame
from tests.broker.raw_client import RawClient, hello
from tests.broker.samples import Samples, scrape, settled, value
from tests.waits import DELIVERY_TIMEOUT_S


@pytest.fixture
def own_broker(broker_factory: Callable[..., Any], backend_url: str) -> Any:
    """A daemon of the test's own; on PostgreSQL with send windows off: the counts below
    include its direct pushes, which windowed sends skip (always stored: docs/postgres.md)."""
    if backend_url.startswith("postgresql:"):
        return broker_factory(extra_args=("--send-window", "0"))
    return broker_factory()


async def test_metrics_count_the_traffic(
    own_broker: Any, make_own_layer: Any, unique: Callable[[str], str], backend_url: str
) -> None:
    """Every message counter, histogram and gauge matches the traffic sent.

    1. 5 sends to a normal channel of capacity 3: 3 accepted, 2 rejected; 3 pulled.
    2. Two members in a group, one made full by 3 sends: a group_send reaches one
       (accepted) and drops the other; the fan-out histogram sees one send of 2.
    3. The 4 messages of the members are pushed (delivered as push; as direct on
       PostgreSQL; the group message at the edge on memory:// and Redis, where the full
       member's layer drops its copy and says so) and received.
    4. 2 messages with a 1 s expiry, taken too late: 2 expired.
    5. Per-operation request and backend histograms count each call.
    """
    is_memory = backend_url.startswith("memory:")
    layer = make_own_layer(capacity=3)
    work = unique("work")
    for index in range(5):
        if index < 3:
            await layer.send(work, {"i": index})
        else:
            with pytest.raises(ChannelFull):
                await layer.send(work, {"i": index})
    for _ in range(3):
        await asyncio.wait_for(layer.receive(work), DELIVERY_TIMEOUT_S)

    group, roomy, full = unique("room"), await layer.new_channel(), await layer.new_channel()
    await layer.group_add(group, roomy)
    await layer.group_add(group, full)
    # On PostgreSQL the daemon pushes to its own clients' channels without storing the
    # message when nothing of theirs waits in the database: a "direct" delivery.
    pushed = "direct" if backend_url.startswith("postgresql:") else "push"
    for index in range(3):
        await layer.send(full, {"fill": index})
    await settled(own_broker, "channels_broker_messages_delivered_total", 3, mode=pushed)
    await layer.group_send(group, {"to": "all"})
    assert await asyncio.wait_for(layer.receive(roomy), DELIVERY_TIMEOUT_S) == {"to": "all"}
    for _ in range(3):
        await asyncio.wait_for(layer.receive(full), DELIVERY_TIMEOUT_S)

    short = make_own_layer(expiry=1)
    stale = unique("stale")
    await short.send(stale, {"late": 1})
    await short.send(stale, {"late": 2})
    await asyncio.sleep(1.2)
    await short.send(stale, {"fresh": True})
    assert await asyncio.wait_for(short.receive(stale), DELIVERY_TIMEOUT_S) == {"fresh": True}
    if is_memory or backend_url.startswith("redis:"):
        # Shared PostgreSQL: any daemon's sweep may expire them; "expired" is per daemon.
        await settled(own_broker, "channels_broker_messages_expired_total", 2)

    direct = 4 if pushed == "direct" else 0
    # The group message, to a client connected here: at the edge but on PostgreSQL.
    edge = 1 if is_memory or backend_url.startswith("redis") else 0
    await settled(own_broker, "channels_broker_messages_dropped_total", 1)
    samples = await settled(
        own_broker, "channels_broker_messages_delivered_total", 4 - direct - edge, mode="push"
    )
    expect = {
        ("channels_broker_messages_accepted_total", "operation", "send"): 3 + 3 + 3,
        ("channels_broker_messages_accepted_total", "operation", "group_send"): 1,
        ("channels_broker_messages_accepted_total", "operation", "send_many"): 0,
        ("channels_broker_messages_rejected_total", "operation", "send"): 2,
        ("channels_broker_messages_delivered_total", "mode", "pull"): 3 + 1,
        ("channels_broker_messages_delivered_total", "mode", "direct"): direct,
        ("channels_broker_messages_delivered_total", "mode", "edge"): edge,
        ("channels_broker_operation_duration_seconds_count", "operation", "send"): 5 + 3 + 3,
        ("channels_broker_operation_duration_seconds_count", "operation", "group_add"): 2,
        ("channels_broker_operation_duration_seconds_count", "operation", "group_send"): 1,
        ("channels_broker_operation_duration_seconds_count", "operation", "hello"): 2,
        ("channels_broker_protocol_errors_total", "code", "channel_full"): 2,
    }
    for (name, label, label_value), count in expect.items():
        assert value(samples, name, **{label: label_value}) == count, (name, label_value)
    assert value(samples, "channels_broker_messages_dropped_total") == 1
    assert value(samples, "channels_broker_group_send_members_count") == 1
    assert value(samples, "channels_broker_group_send_members_sum") == 2
    assert value(samples, "channels_broker_group_send_members_bucket", le="1.0") == 0
    assert value(samples, "channels_broker_group_send_members_bucket", le="2.0") == 1
    assert_backend_calls(samples, backend_url, sends=5 + 3 + 3)
    assert value(samples, "channels_broker_connections") == 2
    assert value(samples, "channels_broker_ready") == 1
    assert value(samples, "channels_broker_backend_up") == 1
    if is_memory:
        assert value(samples, "channels_broker_groups") == 1
        assert value(samples, "channels_broker_group_memberships") == 2
        assert value(samples, "channels_broker_messages_waiting") == 0


def assert_backend_calls(samples: Samples, backend_url: str, sends: int) -> None:
    """Shared backends: storage calls timed, none failed. memory://: not timed at all."""
    timed = {
        dict(labels)["operation"]: count
        for (name, labels), count in samples.items()
        if name == "channels_broker_backend_operation_duration_seconds_count"
    }
    if backend_url.startswith("memory:"):
        assert timed == {}, "in-process memory:// calls are not timed"
        return
    assert {dict(labels)["backend"] for name, labels in samples if "backend" in dict(labels)} == {
        backend_url.split(":", 1)[0]
    }
    # The daemon may batch consecutive SENDs into one send_many call.
    windowed = timed.get("send_reserving", 0) + timed.get("send_reserved", 0)  # send windows
    assert 1 <= timed["send"] + timed["send_many"] + windowed <= sends
    errors = [
        count
        for (name, _labels), count in samples.items()
        if name == "channels_broker_backend_errors_total"
    ]
    assert errors and sum(errors) == 0


@pytest.mark.backends("memory")  # shared storage's gauges count every test's data
async def test_gauges_show_waiting_messages_and_connections(
    own_broker: Any, make_own_layer: Any, unique: Callable[[str], str], backend_url: str
) -> None:
    """Messages nobody took are waiting; closed connections are gone from the gauge."""
    layer = make_own_layer()
    first, second = unique("backlog"), unique("backlog")
    for index in range(3):
        await layer.send(first, {"i": index})
    await layer.send(second, {"i": 0})
    samples = await asyncio.to_thread(scrape, own_broker)
    assert value(samples, "channels_broker_messages_waiting") == 4
    assert value(samples, "channels_broker_channels_waiting") == 2
    assert value(samples, "channels_broker_connections") == 1
    await layer.close()
    await settled(own_broker, "channels_broker_connections", 0)


async def test_send_many_and_protocol_errors_are_counted(
    own_broker: Any, unique: Callable[[str], str]
) -> None:
    """SEND_MANY's accepted and refused items, and each ERROR code, are counted."""
    channel = unique("batch")
    raw = await RawClient.open(own_broker.address)
    try:
        await raw.write(hello(capacity=2))
        assert isinstance(await raw.next_frame(), Welcome)
        items = tuple((channel, b"payload") for _ in range(3))
        await raw.write(encode_frame(SendMany(1, items)))
        reply = await raw.next_frame()
        assert isinstance(reply, Ok) and reply.rejected == (2,), reply
        await raw.write(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # not msgpack: MALFORMED_FRAME
        error = await raw.next_frame()
        assert isinstance(error, Error) and error.error_code is ErrorCode.MALFORMED_FRAME
    finally:
        raw.close()
    samples = await asyncio.to_thread(scrape, own_broker)
    name = "channels_broker_messages_accepted_total"
    assert value(samples, name, operation="send_many") == 2
    assert value(samples, "channels_broker_messages_rejected_total", operation="send_many") == 1
    assert value(samples, "channels_broker_protocol_errors_total", code="malformed_frame") == 1
    assert (
        value(samples, "channels_broker_operation_duration_seconds_count", operation="send_many")
        == 1
    )


async def test_auth_failures_are_counted(broker_factory: Callable[..., Any]) -> None:
    """A HELLO with a wrong token counts one auth failure (and one AUTH_FAILED error)."""
    guarded = broker_factory(token="s3cret")
    for token in ("guess", "s3cret"):
        raw = await RawClient.open(guarded.address)
        try:
            await raw.write(hello(token=token))
            reply = await raw.next_frame()
        finally:
            raw.close()
        assert isinstance(reply, Welcome if token == "s3cret" else Error), reply
    samples = await asyncio.to_thread(scrape, guarded)
    assert value(samples, "channels_broker_auth_failures_total") == 1
    assert value(samples, "channels_broker_protocol_errors_total", code="auth_failed") == 1


async def test_series_do_not_grow_with_channel_or_group_names(
    own_broker: Any, make_own_layer: Any, unique: Callable[[str], str]
) -> None:
    """Cardinality is bounded: 50 more channels and groups add no series or label value."""
    layer = make_own_layer()

    async def traffic(count: int) -> list[str]:
        names = [unique("card") for _ in range(count)]
        for name in names:
            channel = await layer.new_channel()
            await layer.group_add(name, channel)
            await layer.group_send(name, {"n": 1})
            await layer.send(name, {"n": 1})
            await layer.receive(name)
        return names

    await traffic(2)
    before = set(await asyncio.to_thread(scrape, own_broker))
    names = await traffic(50)
    after = set(await asyncio.to_thread(scrape, own_broker))
    assert after == before
    label_values = {label for _, labels in after for _, label in labels}
    assert not label_values & set(names)


async def test_build_and_process_metrics_are_exported(own_broker: Any) -> None:
    """build_info carries the version; the process collector's series are there."""
    from broker import __version__

    samples = await asyncio.to_thread(scrape, own_broker)
    build = [labels for name, labels in samples if name == "channels_broker_build_info"]
    assert len(build) == 1 and ("version", __version__) in build[0]
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds"):
        assert (name, frozenset()) in samples, name
