"""The path of one message through our code is short: a group_send on ``memory://``, from
``BrokerChannelLayer.group_send`` to the member's ``receive()`` returning, runs code of at most
eight modules of ours (docs/architecture.md walks it). Measured, not read: the daemon runs
in this process and a profiler hook records every module whose code runs on the way."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

from broker.config import Config
from broker.daemon import Server
from broker.layer import BrokerChannelLayer
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
OURS = tuple(str(ROOT / package) + "/" for package in ("protocol", "backends", "broker"))
#: What the done-when line of issue 13 allows, and what docs/architecture.md lists.
MAX_MODULES = 8


async def modules_entered(action: Callable[[], Awaitable[Any]]) -> list[str]:
    """Our modules whose code runs while ``action`` is awaited, in order of first entry.

    The daemon shares the event loop, so its callbacks and coroutines (each resumption
    is a profiler "call") are seen as well as the layer's.
    """
    entered: dict[str, None] = {}

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        filename = frame.f_code.co_filename
        if event == "call" and filename.startswith(OURS):
            entered[Path(filename).relative_to(ROOT).as_posix()] = None

    sys.setprofile(profile)
    try:
        await action()
    finally:
        sys.setprofile(None)
    return list(entered)


async def test_a_group_send_on_memory_runs_code_of_at_most_eight_modules() -> None:
    port = free_port()
    server = Server(Config(listen=(f"127.0.0.1:{port}",), metrics_listen=None))
    await server.start()
    layer = BrokerChannelLayer(hosts=[f"tcp://127.0.0.1:{port}"])
    try:
        member = await layer.new_channel()
        await layer.group_add("room", member)
        await layer.group_send("room", {"type": "warm.up"})  # connected, caches warm
        assert await layer.receive(member) == {"type": "warm.up"}

        async def one_message() -> None:
            await layer.group_send("room", {"type": "chat.message", "text": "hello"})
            assert await layer.receive(member) == {"type": "chat.message", "text": "hello"}

        path = await modules_entered(one_message)
    finally:
        await layer.close()
        await server.shutdown()

    print("\n".join(path))
    assert len(path) <= MAX_MODULES, path
    assert path[0] == "broker/layer/channel_layer.py"
    assert "backends/memory/groups.py" in path  # the group send, by owning client
