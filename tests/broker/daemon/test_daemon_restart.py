"""Restarting the daemon under load loses no accepted message on a shared backend.

What an operator's ``systemctl restart`` (or an upgrade) does: SIGTERM, wait for a
clean exit, start again on the same ports. Runs once per shared backend of
``BACKEND_URLS`` (Redis, PostgreSQL); ``memory://`` keeps its messages in the
daemon, so there a restart loses them by design.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.broker.daemon.traffic import Readers, assert_once_in_order, send_until_accepted
from tests.conftest import LayerFactory

MESSAGES = 400
RESTART_AT = 120
#: Pause between sends: the restart happens while messages keep coming.
SEND_INTERVAL_S = 0.004
#: What "consumers reconnect by themselves within a few seconds" means here.
RESUME_WITHIN_S = 5.0
#: A reader's pause after each message where a backlog must build up: 2.5x the sender's.
BACKLOG_PACE_S = 0.01


@pytest.mark.backends("shared")  # memory:// keeps messages in the daemon: a restart loses them
async def test_daemon_restart_under_load_loses_no_accepted_message(
    backend_url: str,
    own_broker: Any,
    make_own_layer: Callable[..., Any],
    unique: Callable[[str], str],
) -> None:
    """1. A sender sends numbered messages to a consumer's own channel (pushed) and to
       a normal channel (pulled by a worker), through one daemon.
    2. After ``RESTART_AT`` messages the daemon is restarted: SIGTERM (it must exit 0),
       then started again on the same ports. The sender's layer sends again, with the
       same message id, a send that met the restart (the test would retry one that
       still failed with BrokerUnavailable, as an application would).
    3. Both readers get every message exactly once, in order; after the daemon is
       back, the first message sent is read within ``RESUME_WITHIN_S``.
    """
    met = await restart_under_load(own_broker, make_own_layer, unique)
    assert met, "no send met the restart: it did not happen under load"


@pytest.mark.backends("memory")
async def test_daemon_restart_under_load_with_a_state_file_loses_nothing_on_memory(
    broker_factory: Callable[..., Any], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """The same on memory://, with --state-file: an upgrade of a single-machine site.
    What waits in the daemon at SIGTERM goes to the file and comes back at the start."""
    broker = broker_factory(extra_args=("--state-file", str(tmp_path / "broker.state")))
    make_layer = LayerFactory(broker)
    try:
        # Readers slower than the sender: a backlog waits in the daemon at SIGTERM.
        await restart_under_load(broker, make_layer, unique, pace_s=BACKLOG_PACE_S)
        # Sends wait out a restart this short (connect_timeout): the backlog shows the load.
        written = re.search(r"written to \S+: (\d+) messages", broker.stderr_text())
        assert written is not None and int(written.group(1)) > 0, "no backlog at SIGTERM"
    finally:
        await make_layer.aclose()


async def restart_under_load(
    own_broker: Any,
    make_own_layer: Callable[..., Any],
    unique: Callable[[str], str],
    pace_s: float = 0.0,
) -> int:
    """Send ``MESSAGES`` to a pushed and a pulled channel, restarting the daemon at
    ``RESTART_AT``; every one must come once, in order, soon after the restart. How
    many sends met the restart: refused (BrokerUnavailable) and tried again, or made
    while the sender had no connection (the daemon had closed it), so they waited for
    the daemon to be back. (Not "in flight when the test saw the daemon listen again":
    on a loaded machine the layer may reconnect, and finish its waiting send, before
    the restarting thread gets to look.)"""
    sender, consumer, worker = make_own_layer(), make_own_layer(), make_own_layer()
    channels = [await consumer.new_channel(), unique("work")]
    restart: asyncio.Task[float] | None = None
    back_at = resume_n = None
    met = 0
    async with Readers(zip((consumer, worker), channels, strict=True), pace_s=pace_s) as readers:
        for n in range(MESSAGES):
            if n == RESTART_AT:
                restart = asyncio.create_task(asyncio.to_thread(restarted, own_broker))
            for channel in channels:
                offline = sender._client().conn is None  # the restart cut it: this one waits
                refused = await send_until_accepted(sender, channel, {"n": n})
                met += bool(refused) or offline
            if restart is not None and restart.done() and back_at is None:
                await restart  # raises if the daemon did not stop cleanly or start again
                back_at, resume_n = time.monotonic(), n + 1
            await asyncio.sleep(SEND_INTERVAL_S)
        assert restart is not None and back_at is not None and resume_n is not None
        assert resume_n < MESSAGES, "the restart took the whole run: send more messages"
        await readers.wait_for_all(MESSAGES)

    for channel in channels:
        assert_once_in_order(readers.got[channel], MESSAGES)
        resumed_at = readers.arrived_at[channel][resume_n]
        assert resumed_at - back_at < RESUME_WITHIN_S, f"{channel} resumed late"
    return met


def restarted(broker: Any) -> float:
    """Restart ``broker``; return when it was listening again."""
    broker.restart()
    return time.monotonic()
