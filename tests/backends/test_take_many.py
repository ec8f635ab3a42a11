"""``take_many``: several channels taken at once, as a connection pushing a group message.

Part of the storage contract; run against every backend URL like the rest of it.
"""

from __future__ import annotations

from backends import Backend

LONG_S = 60.0


async def test_take_many_takes_each_channel_in_order(backend: Backend, ns: str) -> None:
    for channel, payloads in (
        ("specific.c1!a", (b"a1", b"a2", b"a3")),
        ("specific.c1!b", (b"b1",)),
    ):
        for payload in payloads:
            assert await backend.send(ns, channel, payload, capacity=10, expiry_s=LONG_S)
    channels = ["specific.c1!a", "specific.c1!b", "specific.c1!empty"]
    taken = await backend.take_many(ns, channels, 2, hold=True)
    assert {channel: [m.payload for m in items] for channel, items in taken.items()} == {
        "specific.c1!a": [b"a1", b"a2"],
        "specific.c1!b": [b"b1"],
        "specific.c1!empty": [],
    }
    assert all(0 < m.ttl_s <= LONG_S for items in taken.values() for m in items)
    assert not await backend.send(ns, "specific.c1!b", b"b2", capacity=1, expiry_s=LONG_S), (
        "taken with hold: still counted"
    )
    await backend.release(ns, "specific.c1!b", 1)
    assert await backend.send(ns, "specific.c1!b", b"b2", capacity=1, expiry_s=LONG_S)
    rest = await backend.take_many(ns, channels, 10, hold=False)
    assert [m.payload for m in rest["specific.c1!a"]] == [b"a3"]
    assert [m.payload for m in rest["specific.c1!b"]] == [b"b2"]


async def test_take_many_of_nothing_is_empty(backend: Backend, ns: str) -> None:
    assert await backend.take_many(ns, [], 10, hold=False) == {}
    assert await backend.take_many(ns, ["nobody", "noone"], 10, hold=False) == {
        "nobody": [],
        "noone": [],
    }
