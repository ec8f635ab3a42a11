"""The layer reads into one buffer per connection (``asyncio.BufferedProtocol``), not into
a new 256 KiB bytes object per read, as an ``asyncio.Protocol`` is given: glibc served
each of those with an mmap, an mremap and a munmap, three system calls per read, unless
its mmap threshold happened to have risen."""

from __future__ import annotations

import tracemalloc

import pytest

from tests.conftest import LayerFactory
from tests.waits import receive

pytestmark = pytest.mark.backends("memory")


async def test_reading_pushed_messages_takes_no_large_buffer(make_layer: LayerFactory) -> None:
    owner, sender = make_layer(), make_layer()
    channel = await owner.new_channel()
    await sender.send(channel, {"n": 0})
    assert await receive(owner, channel) == {"n": 0}  # connected: its buffer is made
    tracemalloc.start()
    try:
        for n in range(1, 4):
            await sender.send(channel, {"n": n})
            assert await receive(owner, channel) == {"n": n}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 128 * 1024
