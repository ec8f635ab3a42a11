"""channel_capacity as the daemon matches it (RE2, ``broker.daemon.capacity``) gives each
channel the capacity Channels would (``BaseChannelLayer.get_capacity``, Python's re), for
the keys Channels users write: globs and compiled regexes, first match wins."""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Any

import pytest
from channels.layers import BaseChannelLayer

from broker.daemon.capacity import (
    MATCH_SLICE_S,
    PROGRAM_PER_PATTERN,
    Bounds,
    CapacityPolicy,
    Refused,
)
from broker.layer.settings import capacity_patterns
from protocol import ErrorCode, Hello

#: Keys as Channels' documentation and its users write them, in an order where first
#: match matters (``websocket.send!*`` before ``*.send!*``).
CHANNEL_CAPACITY: dict[Any, int] = {
    "http.request": 200,
    "http.response!*": 10,
    re.compile(r"^websocket.send\!.+"): 20,
    "*.send!*": 30,
    "chat.*.room*": 40,
    "[!a-c]x?": 50,
    "[]]*": 60,
    re.compile(r"^big\Z"): 70,
    re.compile(r"^(?:tiny|small)$"): 80,
    re.compile(r"(?i)^LOUD"): 90,
}
NAMES = [
    "http.request", "http.requestX", "http.response!abc", "http.response",
    "websocket.send!xyz", "websocket.send!", "other.send!q", "chat.a.room1",
    "chat.room", "chat.x.y.room", "dxz", "axz", "dx", "]x", "big", "bigger", "tiny",
    "small", "smaller", "loud.one", "Loud", "unmatched", "specific.ab12!x",
]  # fmt: skip
BOUNDS = Bounds(max_capacity=10_000, max_expiry_s=86400, max_group_expiry_s=86400, max_patterns=16)


def test_every_name_gets_the_capacity_channels_gives_it() -> None:
    channels = BaseChannelLayer(capacity=100, channel_capacity=CHANNEL_CAPACITY)
    channels.channel_capacity = channels.compile_capacities(CHANNEL_CAPACITY)
    policy = CapacityPolicy(100, capacity_patterns(CHANNEL_CAPACITY), BOUNDS.max_program)

    assert {name: policy(name) for name in NAMES} == {
        name: channels.get_capacity(name) for name in NAMES
    }


def hello(*patterns: tuple[str, int]) -> Hello:
    return Hello(1, "", "", "asgi", 100, 60.0, 86400.0, patterns)


@pytest.mark.parametrize(
    ("patterns", "code", "said"),
    [
        ((("(?=x)", 1),), ErrorCode.MALFORMED_FRAME, "(?="),
        ((("x" * 257, 1),), ErrorCode.OVER_LIMIT, "257 characters"),
        (tuple((f"^p{index}", 1) for index in range(17)), ErrorCode.OVER_LIMIT, "--max-patterns"),
        ((("[a-z]{200}", 1),) * 6, ErrorCode.OVER_LIMIT, "RE2 instructions"),
        ((("^big", 10_001),), ErrorCode.OVER_LIMIT, "--max-capacity"),
    ],
    ids=["syntax", "length", "count", "program", "capacity"],
)
def test_a_hello_the_policy_cannot_take_is_refused(
    patterns: tuple[tuple[str, int], ...], code: ErrorCode, said: str
) -> None:
    with pytest.raises(Refused) as refused:
        BOUNDS.check(hello(*patterns))
        CapacityPolicy.from_hello(hello(*patterns), BOUNDS)

    assert refused.value.code is code
    assert said in str(refused.value)


def test_a_catastrophic_pattern_matches_in_microseconds() -> None:
    """``(a+)+$`` takes Python's re seconds on 28 characters, doubling with each more."""
    policy = CapacityPolicy(100, ((r"(a+)+$", 5),), PROGRAM_PER_PATTERN)
    started = time.perf_counter()
    assert policy("a" * 98 + "!") == 100
    assert policy("a" * 99) == 5
    assert time.perf_counter() - started < 0.01


def test_lookups_are_cached_per_name_and_the_cache_is_bounded() -> None:
    policy = CapacityPolicy(100, (("^a", 5),), PROGRAM_PER_PATTERN)
    for index in range(CapacityPolicy.CACHE_SIZE + 10):
        assert policy(f"a{index}") == 5
    assert len(policy._cache) <= CapacityPolicy.CACHE_SIZE


def test_connections_with_the_same_settings_share_one_policy() -> None:
    """A site's processes send the same HELLO: one compiled matcher, one memory of names."""
    patterns = (("^big", 5),)
    one = CapacityPolicy.from_hello(hello(*patterns), BOUNDS)
    assert CapacityPolicy.from_hello(hello(*patterns), BOUNDS) is one
    assert CapacityPolicy.from_hello(hello(("^big", 6)), BOUNDS) is not one
    assert CapacityPolicy.from_hello(hello(), BOUNDS) is not one


async def test_a_batch_of_slow_names_is_matched_in_slices_the_loop_runs_between() -> None:
    """300 names at about 0.2 ms each under 15 slow patterns (none matches): the loop
    runs other work every MATCH_SLICE_S or so, and the capacities come back in order,
    then remembered."""
    slow = tuple((rf"[a-z]*{'ab'[index % 2]}[a-z]{{30}}x", 5) for index in range(15))
    policy = CapacityPolicy(100, (*slow, ("^b", 7)), BOUNDS.max_program)
    rng = random.Random(14)
    names = ["".join(rng.choices("ab", k=40)) for _ in range(300)]
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    try:
        started = time.thread_time()
        capacities = await policy.all_of(names)
        matching_s = time.thread_time() - started
    finally:
        ticker.cancel()
    assert capacities == [7 if name.startswith("b") else 100 for name in names]
    assert matching_s > 10 * MATCH_SLICE_S, "the patterns were not slow: nothing to show"
    assert ticks >= matching_s / MATCH_SLICE_S / 4
    assert policy._cache.keys() >= set(names)
