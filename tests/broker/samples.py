"""A daemon's /metrics as samples: scrape them all, read one, wait until one settles."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.broker.http_client import http_get
from tests.waits import POLL_S

__all__ = ["Samples", "scrape", "settled", "value"]

#: How long a count that lags the traffic (expiry sweeps, pushes in flight) may take.
SETTLE_TIMEOUT_S = 10.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(broker: Any) -> Samples:
    """Every sample of the daemon's /metrics, by (name, labels)."""
    text = http_get(broker.metrics_port, "/metrics")[1].decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels} in /metrics"
    return samples[key]


async def settled(broker: Any, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until ``name{labels}`` reads ``expected``; fail with the last reading."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        samples = await asyncio.to_thread(scrape, broker)
        found = samples.get((name, frozenset(labels.items())))
        if found == expected:
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"{name}{labels} is {found}, expected {expected}")
        await asyncio.sleep(POLL_S)
