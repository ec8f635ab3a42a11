"""Contract behaviours 1-9 and 22-25: sending, receiving, names, sizes, flush, close.

Every test runs against a real daemon, once per backend (the ``broker`` fixture).
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from protocol import DEFAULT_MAX_MESSAGE_BYTES
from tests.waits import (
    DELIVERY_TIMEOUT_S,
    IN_FLIGHT_S,
    QUIET_S,
    assert_nothing_within,
    receive,
)

#: Ceiling for a burst of 200 concurrent operations on a slow (shared, loaded) backend.
BURST_TIMEOUT_S = 15.0

KINDS = ["normal", "specific"]

BAD_NAMES = [
    pytest.param("¯\\_(ツ)_/¯", id="shrug"),
    pytest.param("chat" * 100, id="400-chars"),
    pytest.param("=+135!", id="punctuation"),
    pytest.param("a" * 100, id="100-chars"),
    pytest.param("a.b!c!d", id="two-bangs"),
    pytest.param(b"bytes-name", id="bytes"),
    pytest.param(None, id="none"),
]


async def channel_of(kind: str, owner: Any, unique: Callable[[str], str]) -> str:
    """A normal channel name, or a process-specific one owned by ``owner``."""
    if kind == "specific":
        name: str = await owner.new_channel()
        return name
    return unique("queue")


def test_layer_surface_matches_channels(make_layer: Any) -> None:
    layer = make_layer()
    assert layer.extensions == ["groups", "flush"]
    for name in ("expiry", "capacity", "channel_capacity", "group_expiry"):
        assert hasattr(layer, name), name
    methods = ("send", "receive", "new_channel", "group_add", "group_discard")
    for name in (*methods, "group_send", "flush", "close"):
        assert inspect.iscoroutinefunction(getattr(layer, name)), name
    assert (layer.expiry, layer.capacity, layer.group_expiry) == (60, 100, 86400)


@pytest.mark.parametrize("kind", KINDS)
async def test_send_then_receive_returns_equal_message(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """Behaviour 1."""
    layer = make_layer()
    channel = await channel_of(kind, layer, unique)
    message = {"type": "test.message", "text": "hello", "n": 1}
    await layer.send(channel, message)
    assert await receive(layer, channel) == message


@pytest.mark.parametrize("kind", KINDS)
async def test_receive_started_before_send_gets_message(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """Behaviour 2."""
    receiver, sender = make_layer(), make_layer()
    channel = await channel_of(kind, receiver, unique)
    pending = asyncio.create_task(receiver.receive(channel))
    await asyncio.sleep(IN_FLIGHT_S)  # let the receive reach the daemon first
    assert not pending.done()
    await sender.send(channel, {"type": "late.send"})
    assert await asyncio.wait_for(pending, DELIVERY_TIMEOUT_S) == {"type": "late.send"}


async def test_new_channel_receives_from_another_instance(make_layer: Any) -> None:
    """Behaviour 3."""
    owner, other = make_layer(), make_layer()
    channel = await owner.new_channel()
    assert "!" in channel
    await other.send(channel, {"type": "to.owner"})
    assert await receive(owner, channel) == {"type": "to.owner"}


async def test_normal_channel_written_by_one_instance_is_received_by_another(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 4."""
    writer, reader = make_layer(), make_layer()
    channel = unique("work")
    await writer.send(channel, {"type": "job", "id": 7})
    assert await receive(reader, channel) == {"type": "job", "id": 7}


async def test_two_instances_waiting_on_one_channel_get_each_message_once(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 5.

    1. Instances A and B both wait on one normal channel.
    2. One message is sent: exactly one of them gets it; the other keeps waiting.
    3. A second message goes to the one still waiting.
    """
    a, b, sender = make_layer(), make_layer(), make_layer()
    channel = unique("shared")
    waiting = {asyncio.create_task(a.receive(channel)), asyncio.create_task(b.receive(channel))}
    await asyncio.sleep(IN_FLIGHT_S)  # let both receives reach the daemon
    await sender.send(channel, {"n": 1})
    done, waiting = await asyncio.wait(
        waiting, timeout=DELIVERY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    assert len(done) == 1, "the first message reached no one"
    await asyncio.sleep(QUIET_S)
    assert len(waiting) == 1 and not next(iter(waiting)).done(), "message delivered twice"
    await sender.send(channel, {"n": 2})
    done2, _ = await asyncio.wait(waiting, timeout=DELIVERY_TIMEOUT_S)
    assert len(done2) == 1, "the second message reached no one"
    assert {done.pop().result()["n"], done2.pop().result()["n"]} == {1, 2}


async def test_concurrent_group_sends_sends_and_receives_deliver_each_message_once(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 6: 100 group_sends, 100 sends and 200 receives, all at once."""
    receiver, sender = make_layer(capacity=200), make_layer(capacity=200)
    member = await receiver.new_channel()
    queue = unique("queue")
    group = unique("group")
    await receiver.group_add(group, member)

    received: list[tuple[str, str, int]] = []

    async def receive_on(channel: str) -> None:
        message = await receiver.receive(channel)
        received.append((channel, message["via"], message["n"]))

    operations = [
        *(sender.group_send(group, {"via": "group", "n": n}) for n in range(100)),
        *(sender.send(queue, {"via": "send", "n": n}) for n in range(100)),
    ]
    random.shuffle(operations)
    receives = [asyncio.create_task(receive_on(c)) for c in [member] * 100 + [queue] * 100]
    await asyncio.wait_for(asyncio.gather(*operations), BURST_TIMEOUT_S)
    _, pending = await asyncio.wait(receives, timeout=BURST_TIMEOUT_S)
    for task in pending:
        task.cancel()
    expected = {(member, "group", n) for n in range(100)} | {(queue, "send", n) for n in range(100)}
    missing = sorted(expected - set(received), key=lambda item: (item[1], item[2]))
    assert not missing, f"{len(missing)} never arrived: {missing}"
    assert len(received) == len(set(received)) == 200, "a message arrived twice"
    await assert_nothing_within(receiver, member, 0.2)
    await assert_nothing_within(receiver, queue, 0.2)


@pytest.mark.parametrize("kind", KINDS)
async def test_channel_keeps_fifo_order(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """Behaviour 7 (the async_to_sync half is in test_contract_sync)."""
    reader, writer = make_layer(), make_layer()
    channel = await channel_of(kind, reader, unique)
    for n in range(3):
        await writer.send(channel, {"n": n})
    assert [(await receive(reader, channel))["n"] for _ in range(3)] == [0, 1, 2]


def _name_calls(bad: Any, good_channel: str) -> dict[str, Callable[[Any], Any]]:
    message = {"type": "x"}
    return {
        "send": lambda layer: layer.send(bad, message),
        "receive": lambda layer: layer.receive(bad),
        "group_add(group)": lambda layer: layer.group_add(bad, good_channel),
        "group_add(channel)": lambda layer: layer.group_add("good-group", bad),
        "group_discard(group)": lambda layer: layer.group_discard(bad, good_channel),
        "group_discard(channel)": lambda layer: layer.group_discard("good-group", bad),
        "group_send": lambda layer: layer.group_send(bad, message),
    }


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_bad_names_raise_type_error_on_every_method(make_layer: Any, bad: Any) -> None:
    """Behaviour 8, against a live daemon."""
    layer = make_layer()
    for method, call in _name_calls(bad, "good-channel").items():
        try:
            await asyncio.wait_for(call(layer), DELIVERY_TIMEOUT_S)
        except TypeError as exc:
            assert "name must be a valid unicode string" in str(exc), method
        else:
            pytest.fail(f"{method} accepted {bad!r}")
    # The layer is still fine afterwards.
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "still.ok"})
    assert await receive(layer, channel) == {"type": "still.ok"}


async def test_bad_names_are_refused_before_any_io(make_layer: Any, dead_url: str) -> None:
    """Behaviour 8: a layer whose daemon is unreachable still raises TypeError at once."""
    layer = make_layer(hosts=[dead_url])
    for bad in ("=+135!", "a" * 100, "a.b!c!d"):
        for method, call in _name_calls(bad, "good-channel").items():
            with pytest.raises(TypeError):
                await asyncio.wait_for(call(layer), 1.0)
                pytest.fail(f"{method} accepted {bad!r}")


async def test_name_of_99_characters_is_accepted(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 8's boundary: 99 characters is the longest valid name."""
    layer = make_layer()
    channel = unique("long").ljust(99, "x")
    group = unique("group").ljust(99, "g")
    await layer.send(channel, {"n": 1})
    assert await receive(layer, channel) == {"n": 1}
    await layer.group_add(group, channel)
    await layer.group_send(group, {"n": 2})
    assert await receive(layer, channel) == {"n": 2}
    await layer.group_discard(group, channel)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param("not a dict", id="str"),
        pytest.param([("type", "x")], id="list"),
        pytest.param({"type": "x", "__asgi_channel__": "a.b!c"}, id="reserved-key"),
    ],
)
async def test_bad_message_is_refused_before_any_io(
    dead_url: str, make_layer: Any, message: Any
) -> None:
    """Contract, Names: a non-dict or a reserved key is refused without touching the wire."""
    layer = make_layer(hosts=[dead_url])
    with pytest.raises((TypeError, ValueError)):
        await asyncio.wait_for(layer.send("good-channel", message), 1.0)
    with pytest.raises((TypeError, ValueError)):
        await asyncio.wait_for(layer.group_send("good-group", message), 1.0)


async def test_new_channel_names_stay_unique_after_random_seed_reset(make_layer: Any) -> None:
    """Behaviour 9."""
    first, second = make_layer(), make_layer()
    names = []
    for layer in (first, first, second):
        random.seed(1)
        names += [await layer.new_channel() for _ in range(100)]
    assert len(set(names)) == 300


@pytest.mark.parametrize("kind", KINDS)
async def test_receive_timeout_leaves_connection_usable(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """Behaviour 22.

    1. ``wait_for(receive(...), 1)`` on an empty channel raises TimeoutError.
    2. A message sent afterwards reaches the next receive: the timed-out one took none.
    """
    layer, sender = make_layer(), make_layer()
    channel = await channel_of(kind, layer, unique)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 1)
    await sender.send(channel, {"after": "timeout"})
    assert await receive(layer, channel) == {"after": "timeout"}
    other = unique("other")
    await layer.send(other, {"n": 1})
    assert await receive(layer, other) == {"n": 1}


ALL_TYPES: dict[str, Any] = {
    "type": "all.types",
    "bytes": b"\x00\xff binary \x80",
    "empty_bytes": b"",
    "str": "h\xe9llo \u2603 \U0001f600",
    "empty_str": "",
    "int": 42,
    "int_max": 2**63 - 1,
    "int_min": -(2**63),
    "float": 3.141592653589793,
    "neg_float": -0.5,
    "true": True,
    "false": False,
    "none": None,
    "list": [1, "two", b"three", None, 4.5],
    "tuple": (1, (2, "x"), b"y"),
    "nested": {"a": {"b": [{"c": b"d", "e": ["f"]}], "g": {}}},
    "empty_list": [],
}

ALL_TYPES_EXPECTED = {**ALL_TYPES, "tuple": [1, [2, "x"], b"y"]}


def _assert_same_types(got: Any, expected: Any, path: str = "message") -> None:
    assert type(got) is type(expected), f"{path}: {type(got).__name__} != {type(expected).__name__}"
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), path
        for key in expected:
            _assert_same_types(got[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for index, (g, e) in enumerate(zip(got, expected, strict=True)):
            _assert_same_types(g, e, f"{path}[{index}]")
    else:
        assert got == expected, path


@pytest.mark.parametrize("kind", KINDS)
async def test_every_allowed_type_round_trips(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """Behaviour 23: bytes stay bytes, str stays str, tuples arrive as lists."""
    layer, sender = make_layer(), make_layer()
    channel = await channel_of(kind, layer, unique)
    await sender.send(channel, ALL_TYPES)
    got = await receive(layer, channel)
    assert got == ALL_TYPES_EXPECTED
    _assert_same_types(got, ALL_TYPES_EXPECTED)


def _message_of_size(size: int) -> dict[str, Any]:
    """A message whose msgpack form is exactly ``size`` bytes."""
    message: dict[str, Any] = {"type": "big", "data": b""}
    overhead = len(msgpack.packb(message, use_bin_type=True))
    # bin8/16/32 headers take 2, 3 or 5 bytes instead of bin8's 2 for the empty value.
    data = size - overhead - 3
    message["data"] = b"x" * data
    packed = len(msgpack.packb(message, use_bin_type=True))
    message["data"] = b"x" * (data + size - packed)
    assert len(msgpack.packb(message, use_bin_type=True)) == size
    return message


#: Room for whatever the layer wraps around the msgpack of the message itself.
UNDER_LIMIT_MARGIN_BYTES = 1024


@pytest.mark.parametrize("kind", KINDS)
async def test_message_just_under_limit_passes(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """Behaviour 23 (and the contract's "at least 1 MB must pass")."""
    layer = make_layer()
    channel = await channel_of(kind, layer, unique)
    message = _message_of_size(DEFAULT_MAX_MESSAGE_BYTES - UNDER_LIMIT_MARGIN_BYTES)
    await layer.send(channel, message)
    got = await receive(layer, channel)
    assert got["data"] == message["data"]


@pytest.mark.parametrize("kind", KINDS)
async def test_message_over_limit_raises_message_too_large_and_nothing_breaks(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """Behaviour 23.

    1. A message before, then one a byte over the limit (send and group_send), then one after.
    2. Both oversized calls raise MessageTooLarge; the others arrive, in order, and only they.
    """
    from broker.layer import MessageTooLarge

    layer, sender = make_layer(), make_layer()
    channel = await channel_of(kind, layer, unique)
    group = unique("group")
    await layer.group_add(group, channel)
    too_large = _message_of_size(DEFAULT_MAX_MESSAGE_BYTES + 1)
    await sender.send(channel, {"n": 1})
    with pytest.raises(MessageTooLarge):
        await sender.send(channel, too_large)
    with pytest.raises(MessageTooLarge):
        await sender.group_send(group, too_large)
    await sender.send(channel, {"n": 2})
    assert [await receive(layer, channel) for _ in range(2)] == [{"n": 1}, {"n": 2}]
    await assert_nothing_within(layer, channel)


async def test_layer_learns_message_limit_from_daemon(
    broker_factory: Callable[..., Any], make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 23 with ``--max-message-bytes``: the layer enforces the daemon's limit."""
    from broker.layer import MessageTooLarge

    limit = 64 * 1024
    small = broker_factory(max_message_bytes=limit)
    layer = make_layer(hosts=[small.url])
    channel = unique("small")
    await layer.send(channel, _message_of_size(limit - UNDER_LIMIT_MARGIN_BYTES))
    with pytest.raises(MessageTooLarge):
        await layer.send(channel, _message_of_size(limit + 1))
    assert len((await receive(layer, channel))["data"]) > limit // 2


async def test_flush_empties_what_another_instance_would_receive(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 24.

    1. B owns a specific channel in a group; A fills it, a normal channel and the group.
    2. A flushes.
    3. B receives nothing on either channel; the group is gone.
    4. Both instances still send and receive.
    """
    a, b = make_layer(), make_layer()
    specific = await b.new_channel()
    normal = unique("queue")
    group = unique("group")
    await b.group_add(group, specific)
    await a.send(specific, {"stale": "direct"})
    await a.group_send(group, {"stale": "group"})
    await a.send(normal, {"stale": "normal"})
    await a.flush()
    await assert_nothing_within(b, specific)
    await assert_nothing_within(b, normal)
    await a.group_send(group, {"stale": "group after flush"})
    await assert_nothing_within(b, specific)
    await a.send(specific, {"fresh": 1})
    assert await receive(b, specific) == {"fresh": 1}
    await b.send(normal, {"fresh": 2})
    assert await receive(a, normal) == {"fresh": 2}


@pytest.mark.parametrize("kind", KINDS)
async def test_close_ends_pending_receive_and_layer_is_reusable(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """Behaviour 25.

    1. A receive waits on an empty channel.
    2. ``close()`` makes it end with an exception instead of hanging.
    3. The same instance then sends and receives again.
    """
    layer = make_layer()
    channel = await channel_of(kind, layer, unique)
    pending = asyncio.create_task(layer.receive(channel))
    await asyncio.sleep(IN_FLIGHT_S)  # let the receive reach the daemon
    await asyncio.wait_for(layer.close(), DELIVERY_TIMEOUT_S)
    done, _ = await asyncio.wait({pending}, timeout=DELIVERY_TIMEOUT_S)
    assert done, "receive still pending after close()"
    with pytest.raises(BaseException):  # noqa: B017 (any error, even CancelledError)
        pending.result()
    again = await channel_of(kind, layer, unique)
    await layer.send(again, {"reused": True})
    assert await receive(layer, again) == {"reused": True}
