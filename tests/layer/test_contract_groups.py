"""Contract behaviours 15-18: group membership, fan-out across processes, group expiry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.waits import assert_nothing_within, receive


async def test_discarded_member_gets_no_group_message_but_still_direct_sends(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 15.

    1. Three members are added; one is discarded.
    2. group_send: the two remaining receive it; the third gets nothing within 1 s.
    3. A direct send to the third still arrives.
    """
    owner, sender = make_layer(), make_layer()
    a, b, c = [await owner.new_channel() for _ in range(3)]
    group = unique("room")
    for member in (a, b, c):
        await owner.group_add(group, member)
    await owner.group_discard(group, c)
    await sender.group_send(group, {"type": "room.message"})
    assert await receive(owner, a) == {"type": "room.message"}
    assert await receive(owner, b) == {"type": "room.message"}
    await assert_nothing_within(owner, c, 1.0)
    await sender.send(c, {"type": "direct"})
    assert await receive(owner, c) == {"type": "direct"}


async def test_group_add_is_idempotent_and_discarding_a_non_member_is_a_no_op(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Contract, Semantics: a member added twice gets a group message once."""
    layer = make_layer()
    member, stranger = await layer.new_channel(), await layer.new_channel()
    group = unique("room")
    await layer.group_add(group, member)
    await layer.group_add(group, member)
    await layer.group_discard(group, stranger)
    await layer.group_discard(unique("never-made"), stranger)
    await layer.group_send(group, {"n": 1})
    assert await receive(layer, member) == {"n": 1}
    await assert_nothing_within(layer, member)
    await assert_nothing_within(layer, stranger, 0.1)


async def test_group_send_to_unknown_group_is_a_no_op(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Contract, Semantics: nothing raised, nothing delivered, connection fine."""
    layer = make_layer()
    await layer.group_send(unique("nobody-here"), {"n": 1})
    channel = await layer.new_channel()
    await layer.send(channel, {"n": 2})
    assert await receive(layer, channel) == {"n": 2}


async def test_every_channel_of_one_process_in_a_group_gets_the_message_once(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 16: five consumers of one process share a group."""
    owner, sender = make_layer(), make_layer()
    members = [await owner.new_channel() for _ in range(5)]
    group = unique("room")
    for member in members:
        await owner.group_add(group, member)
    await sender.group_send(group, {"type": "fanout"})
    got = await asyncio.gather(*(receive(owner, member) for member in members))
    assert got == [{"type": "fanout"}] * 5
    await asyncio.gather(*(assert_nothing_within(owner, member) for member in members))


async def test_group_send_from_either_instance_reaches_members_on_both(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 17: members on two instances (as two processes would be)."""
    first, second = make_layer(), make_layer()
    members = [
        (first, await first.new_channel()),
        (first, await first.new_channel()),
        (second, await second.new_channel()),
        (second, await second.new_channel()),
    ]
    group = unique("room")
    for owner, channel in members:
        await owner.group_add(group, channel)
    for origin, label in ((first, "from-first"), (second, "from-second")):
        await origin.group_send(group, {"origin": label})
        got = await asyncio.gather(*(receive(owner, channel) for owner, channel in members))
        assert got == [{"origin": label}] * 4
    await asyncio.gather(*(assert_nothing_within(owner, channel) for owner, channel in members))


async def test_group_membership_expires_after_group_expiry_unless_renewed(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 18, with ``group_expiry=2``.

    1. t=0: add members A and B.   2. t=1.5: add B again (renews it).
    3. t=3: group_send: B receives, A (added 3 s ago) does not.
    4. Add A again; group_send: A receives. (B's renewal lapses at t=3.5: not checked.)
    """
    owner = make_layer(group_expiry=2)
    sender = make_layer(group_expiry=2)
    a, b = await owner.new_channel(), await owner.new_channel()
    group = unique("room")
    loop = asyncio.get_running_loop()
    start = loop.time()
    await owner.group_add(group, a)
    await owner.group_add(group, b)
    await asyncio.sleep(start + 1.5 - loop.time())
    await owner.group_add(group, b)
    await asyncio.sleep(start + 3.0 - loop.time())
    await sender.group_send(group, {"n": 1})
    assert await receive(owner, b) == {"n": 1}
    await assert_nothing_within(owner, a)
    await owner.group_add(group, a)
    await sender.group_send(group, {"n": 2})
    assert await receive(owner, a) == {"n": 2}
