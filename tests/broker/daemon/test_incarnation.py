"""WELCOME names the daemon's store (its incarnation), for a client that asks.

memory://: a name per start that begins empty, the same for every client of that
start; a shared store (Redis, PostgreSQL) outlives its daemons and has none (""). A
client of an earlier release does not ask, and gets a WELCOME as long as it knows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from protocol import PROTOCOL_VERSION, Hello, Welcome, encode_frame
from tests.broker.raw_client import RawClient


async def _welcome(broker: Any, wants_incarnation: bool) -> Welcome:
    client = await RawClient.open(broker.address)
    try:
        hello = Hello(PROTOCOL_VERSION, "", "", "asgi", 100, 60.0, 86400.0)
        hello = dataclasses.replace(hello, wants_incarnation=wants_incarnation)
        await client.write(encode_frame(hello))
        welcome = await client.next_frame()
        assert isinstance(welcome, Welcome)
        return welcome
    finally:
        client.close()


async def test_welcome_names_the_store_for_a_client_that_asks(
    broker: Any, backend_url: str
) -> None:
    first, second = await _welcome(broker, True), await _welcome(broker, True)
    if backend_url.startswith("memory:"):
        assert len(first.incarnation) == 16 and second.incarnation == first.incarnation
    else:
        assert first.incarnation == second.incarnation == ""
    earlier = await _welcome(broker, False)
    assert earlier.incarnation == ""
    # As the daemon encodes it: no field past send_window, as an earlier layer reads it.
    assert len(msgpack.unpackb(encode_frame(earlier)[4:])) <= 6
