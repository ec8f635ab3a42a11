"""Contract behaviours 10-13: capacity per channel, per-channel overrides, group_send skips."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from tests.waits import assert_nothing_within, receive


async def fill(layer: Any, channel: str, count: int) -> None:
    for n in range(count):
        await layer.send(channel, {"n": n})


async def test_fourth_send_to_normal_channel_of_capacity_three_raises_channel_full(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 10, normal channel: a reader on another instance frees a slot."""
    sender, reader = make_layer(capacity=3), make_layer(capacity=3)
    channel = unique("queue")
    await fill(sender, channel, 3)
    with pytest.raises(ChannelFull):
        await sender.send(channel, {"n": 3})
    assert await receive(reader, channel) == {"n": 0}
    await sender.send(channel, {"n": 4})
    assert [(await receive(reader, channel))["n"] for _ in range(3)] == [1, 2, 4]


async def test_fourth_send_to_specific_channel_of_capacity_three_raises_channel_full(
    make_layer: Any,
) -> None:
    """Behaviour 10, process-specific channel.

    The owner sends to itself, so its acknowledgement of the received message and the
    next send travel in order on one connection.
    """
    owner = make_layer(capacity=3)
    channel = await owner.new_channel()
    await fill(owner, channel, 3)
    with pytest.raises(ChannelFull):
        await owner.send(channel, {"n": 3})
    assert await receive(owner, channel) == {"n": 0}
    await owner.send(channel, {"n": 4})
    assert [(await receive(owner, channel))["n"] for _ in range(3)] == [1, 2, 4]


async def test_channel_capacity_overrides_are_honoured(make_layer: Any) -> None:
    """Behaviour 11: ``{"tiny": 1, re.compile(r"^big"): 1000}``, default elsewhere."""
    prefix = f"cap{uuid.uuid4().hex[:8]}"
    config = {"tiny": 1, re.compile(r"^big"): 1000}
    layer = make_layer(prefix=prefix, channel_capacity=config)
    await layer.flush()  # "tiny" is a fixed name: drop any left by an earlier run
    await layer.send("tiny", {"n": 0})
    with pytest.raises(ChannelFull):
        await layer.send("tiny", {"n": 1})
    big = f"big-{uuid.uuid4().hex[:8]}"
    await fill(layer, big, 1000)
    with pytest.raises(ChannelFull):
        await layer.send(big, {"n": 1000})
    other = f"other-{uuid.uuid4().hex[:8]}"
    await fill(layer, other, 100)
    with pytest.raises(ChannelFull):
        await layer.send(other, {"n": 100})
    await layer.flush()


async def test_full_consumer_does_not_make_another_consumer_of_same_process_full(
    make_layer: Any,
) -> None:
    """Behaviour 12: capacity counts per full channel name, not per process."""
    owner, sender = make_layer(capacity=3), make_layer(capacity=3)
    full, other = await owner.new_channel(), await owner.new_channel()
    await fill(sender, full, 3)
    with pytest.raises(ChannelFull):
        await sender.send(full, {"n": 3})
    await fill(sender, other, 3)
    with pytest.raises(ChannelFull):
        await sender.send(other, {"n": 3})
    assert [(await receive(owner, other))["n"] for _ in range(3)] == [0, 1, 2]
    assert [(await receive(owner, full))["n"] for _ in range(3)] == [0, 1, 2]


async def test_group_send_to_full_member_never_raises_and_others_still_receive(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 13.

    1. A group of three with capacity 3: a consumer that never reads, one that reads
       after every send (same process), and a normal channel read from another instance.
    2. Six group_sends: none raises; the readers get each message.
    3. The stalled member gets exactly the first three, then nothing.
    """
    owner, sender, worker = make_layer(capacity=3), make_layer(capacity=3), make_layer(capacity=3)
    stalled, live = await owner.new_channel(), await owner.new_channel()
    queue = unique("queue")
    group = unique("group")
    for member in (stalled, live, queue):
        await owner.group_add(group, member)
    for n in range(6):
        await sender.group_send(group, {"n": n})
        assert await receive(owner, live) == {"n": n}
        assert await receive(worker, queue) == {"n": n}
    assert [(await receive(owner, stalled))["n"] for _ in range(3)] == [0, 1, 2]
    await assert_nothing_within(owner, stalled)
