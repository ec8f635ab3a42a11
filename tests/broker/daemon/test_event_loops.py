"""``serve --loop``: the daemon on uvloop or on asyncio's own loop, and a layer on uvloop
(Uvicorn's default loop) talking to it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import pytest
import uvloop

from broker.daemon.loops import loop_name
from broker.errors import ConfigError
from broker.layer import BrokerChannelLayer
from tests.conftest import BrokerProcess
from tests.waits import DELIVERY_TIMEOUT_S

pytestmark = pytest.mark.backends("memory")


async def exchange(url: str) -> None:
    """A send, a group_send and their receives through two layers."""
    sender, receiver = BrokerChannelLayer(hosts=[url]), BrokerChannelLayer(hosts=[url])
    try:
        channel = await receiver.new_channel()
        await receiver.group_add("room", channel)
        await sender.send(channel, {"type": "direct", "n": 1})
        await sender.group_send("room", {"type": "group", "n": 2})
        async with asyncio.timeout(DELIVERY_TIMEOUT_S):
            first, second = await receiver.receive(channel), await receiver.receive(channel)
        assert (first["n"], second["n"]) == (1, 2)
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_daemon_serves_on_the_loop_asked_for(
    broker_factory: Callable[..., BrokerProcess], loop: str
) -> None:
    daemon = broker_factory(extra_args=("--loop", loop))
    daemon.wait_for_log(lambda line: f"event loop: {loop}" in line)
    asyncio.run(exchange(daemon.url))


def test_layer_on_uvloop_talks_to_the_daemon(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    # uvloop's transports are no asyncio.Transport subclasses: an isinstance check failed.
    daemon = broker_factory(extra_args=("--loop", "uvloop"))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(exchange(daemon.url))


def test_auto_is_uvloop_when_installed_and_asyncio_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert loop_name("auto") == "uvloop"
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert loop_name("auto") == "asyncio"
    assert loop_name("asyncio") == "asyncio"
    with pytest.raises(ConfigError, match=r"pip install 'channels-broker\[uvloop\]'"):
        loop_name("uvloop")


def test_tls_listeners_run_on_asyncio() -> None:
    # uvloop reads the ClientHello before the handshake can (broker/daemon/loops.py).
    assert loop_name("auto", has_tls=True) == "asyncio"
    with pytest.raises(ConfigError, match="--loop asyncio"):
        loop_name("uvloop", has_tls=True)
