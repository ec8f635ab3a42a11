"""How long the tests wait, once for all of them, and the waits they share.

Every deadline here is a ceiling for a failure, not a pause: a test that passes waits
only as long as the daemon takes. The exceptions say so: ``QUIET_S`` (watching that
nothing arrives) and ``IN_FLIGHT_S`` (a request with no event to say it has arrived).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

__all__ = [
    "DELIVERY_TIMEOUT_S",
    "IN_FLIGHT_S",
    "POLL_S",
    "QUIET_S",
    "RECONNECT_TIMEOUT_S",
    "RECOVERY_TIMEOUT_S",
    "RETRY_S",
    "START_TIMEOUT_S",
    "assert_nothing_within",
    "receive",
]

#: How long a message (or the frame that answers a request) may take to arrive before
#: the test calls it lost: far above a loaded machine's worst, far below the per-test timeout.
DELIVERY_TIMEOUT_S = 5.0
#: How long a channel is watched to call it empty: a second delivery or a late duplicate
#: shows within it. This one is a pause every passing test pays.
QUIET_S = 0.5
#: A pause for a request just made (a waiting receive, an acknowledgement) to reach the
#: daemon, where no event says it has; only ever before a step that needs it there.
IN_FLIGHT_S = 0.2
#: How long a layer may take to find a restarted daemon: a few reconnect rounds, whose
#: delay the layer caps at 2 s.
RECONNECT_TIMEOUT_S = 15.0
#: How long all of a run's messages may take to arrive once a daemon or storage outage
#: is over: a backlog of hundreds, behind reconnects on every side.
RECOVERY_TIMEOUT_S = 30.0
#: How long a process or listener (a daemon, a redis-server, an HTTP listener) may take
#: to start answering, or to stop.
START_TIMEOUT_S = 10.0
#: The pause between two looks at something that gives no event (a port, a log file, an
#: HTTP answer): short, since a test waits for it at every start.
POLL_S = 0.02
#: The pause before a send refused with BrokerUnavailable is tried again, as an
#: application would.
RETRY_S = 0.05


async def receive(
    layer: Any, channel: str, timeout_s: float = DELIVERY_TIMEOUT_S
) -> dict[str, Any]:
    """The next message on ``channel``; fails the test after ``timeout_s``."""
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), timeout_s)
    return message


async def assert_nothing_within(layer: Any, channel: str, seconds: float = QUIET_S) -> None:
    """Fail the test if ``channel`` receives anything within ``seconds``."""
    try:
        message = await asyncio.wait_for(layer.receive(channel), seconds)
    except TimeoutError:
        return
    pytest.fail(f"{channel} unexpectedly received {message!r}")
