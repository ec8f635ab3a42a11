"""Restarting the daemon under load loses no accepted message on a shared backend.

What an operator's ``systemctl restart`` (or an upgrade) does: SIGTERM, wait for a
clean exit, start again on the same ports. Runs once per shared backend of
``BACKEND_URLS`` (Redis, PostgreSQL); ``memory://`` keeps its messages in the
daemon, so there a restart loses them by design.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.broker.daemon.traffic import Readers, assert_once_in_order, send_until_accepted

MESSAGES = 400
RESTART_AT = 120
#: Pause between sends: the restart happens while messages keep coming.
SEND_INTERVAL_S = 0.004
#: A send that took this long met the restart (one takes a millisecond or so).
MET_RESTART_S = 0.2
#: What "consumers reconnect by themselves within a few seconds" means here.
RESUME_WITHIN_S = 5.0


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
    sender, consumer, worker = make_own_layer(), make_own_layer(), make_own_layer()
    channels = [await consumer.new_channel(), unique("work")]
    restart: asyncio.Task[None] | None = None
    back_at = resume_n = None
    waited = 0  # sends that met the restart
    async with Readers(zip((consumer, worker), channels, strict=True)) as readers:
        for n in range(MESSAGES):
            if n == RESTART_AT:
                restart = asyncio.create_task(asyncio.to_thread(own_broker.restart))
            for channel in channels:
                started = time.monotonic()
                await send_until_accepted(sender, channel, {"n": n})
                waited += time.monotonic() - started > MET_RESTART_S
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
    assert waited, "no send met the restart: it did not happen under load"
