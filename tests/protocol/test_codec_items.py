"""A daemon's decoder bounds the work of one frame, not only its bytes: items per array,
objects in all (``FrameDecoder(max_items=...)``); and a ttl always fits its field."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from protocol import (
    LONGEST_EXPIRY_S,
    Ack,
    ErrorCode,
    FrameDecoder,
    FrameOverLimit,
    Hello,
    MalformedFrame,
    Push,
    SendMany,
    encode_frame,
    ttl_ms,
)
from tests.broker.raw_client import raw_frame

MAX_ITEMS = 100
#: Refusing must not cost what decoding would (about a second for two million pairs):
#: far under the 50 ms a stall may take. CPU time of this thread, so that other work on
#: a loaded machine does not count (wall time ran to 14 ms there).
REFUSAL_BUDGET_S = 0.01


def bounded(data: bytes) -> FrameDecoder:
    decoder = FrameDecoder(64 * 1024 * 1024, max_items=MAX_ITEMS, limit_name="--max-batch")
    decoder.receive_data(data)
    return decoder


@pytest.mark.parametrize(
    "frame",
    [
        SendMany(1, tuple(("c", b"x" * 1000) for _ in range(MAX_ITEMS))),
        Ack(tuple((f"c{index}", 1) for index in range(MAX_ITEMS))),
        Hello(1, "", "", "asgi", 100, 60.0, 86400.0, tuple(("p", 1) for _ in range(MAX_ITEMS))),
    ],
    ids=["send-many", "ack", "hello"],
)
def test_a_frame_of_max_items_is_decoded(frame: Any) -> None:
    assert bounded(encode_frame(frame)).next_frame() == frame


@pytest.mark.parametrize(
    "frame",
    [
        SendMany(1, tuple(("c", b"") for _ in range(MAX_ITEMS + 1))),
        Ack(tuple(("c", 1) for _ in range(2_000_000))),
    ],
    ids=["one-over", "two-million"],
)
def test_an_array_over_max_items_is_refused_from_its_header(frame: Any) -> None:
    decoder = bounded(encode_frame(frame))
    started = time.thread_time()
    with pytest.raises(FrameOverLimit) as refused:
        decoder.next_frame()

    assert time.thread_time() - started < REFUSAL_BUDGET_S
    assert refused.value.code is ErrorCode.OVER_LIMIT
    assert "100 items" in str(refused.value) and "--max-batch" in str(refused.value)


def test_nested_arrays_are_refused_by_their_object_count() -> None:
    """Each array under the bound, a million objects in all: refused after 64 K of them
    (what a frame of MAX_ITEMS pairs holds, or 64 K, the most built without counting)."""
    bomb = raw_frame([Ack.TYPE, [[[1] * MAX_ITEMS] * MAX_ITEMS] * MAX_ITEMS])
    decoder = bounded(bomb)
    started = time.thread_time()
    with pytest.raises(FrameOverLimit, match="objects"):
        decoder.next_frame()
    assert time.thread_time() - started < REFUSAL_BUDGET_S


def test_a_map_is_malformed_not_decoded() -> None:
    with pytest.raises(MalformedFrame):
        bounded(raw_frame([Ack.TYPE, {"c": 1}])).next_frame()


def test_without_max_items_a_decoder_reads_a_whole_group_in_one_push() -> None:
    """The layer's decoder: a PUSH lists every member of a group on one connection."""
    push = Push(tuple(f"specific.ab12!{index}" for index in range(20_000)), b"x", 1000)
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(push))
    assert decoder.next_frame() == push


@pytest.mark.parametrize(
    ("ttl_s", "expected"),
    [
        (1.5, 1500),
        (0.0, 0),
        (-3.0, 0),
        (math.nan, 0),
        (math.inf, LONGEST_EXPIRY_S * 1000),
        (1e17, LONGEST_EXPIRY_S * 1000),
    ],
)
def test_a_ttl_is_always_a_field_push_can_carry(ttl_s: float, expected: int) -> None:
    assert ttl_ms(ttl_s) == expected
    Push(("c",), b"x", ttl_ms(ttl_s))  # no MalformedFrame
