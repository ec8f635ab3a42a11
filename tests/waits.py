"""What the tests share about waiting: receiving with a deadline, and asserting silence."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

#: How long a message may take to arrive before a test fails.
DELIVERY_TIMEOUT_S = 5.0
#: How long "nothing arrives" is watched for.
QUIET_S = 0.5


async def receive(layer: Any, channel: str) -> dict[str, Any]:
    """The next message on ``channel``; fails the test after ``DELIVERY_TIMEOUT_S``."""
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), DELIVERY_TIMEOUT_S)
    return message


async def assert_nothing_within(layer: Any, channel: str, seconds: float = QUIET_S) -> None:
    """Fail the test if ``channel`` receives anything within ``seconds``."""
    try:
        message = await asyncio.wait_for(layer.receive(channel), seconds)
    except TimeoutError:
        return
    pytest.fail(f"{channel} unexpectedly received {message!r}")
