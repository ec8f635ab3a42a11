"""The regression guard: our daemon and layer against a plain asyncio echo, measured in
turns in the same run, must stay above the ratios stored in tests/bench_floor.json.

Ratios, not times: a loaded machine slows the echo and us alike. Each round measures
the echo, then ours; each number is a median of per-operation times and the guard
takes the median of the rounds' ratios, so a stall here and there moves nothing. The
daemon runs on asyncio's loop, as the echo does, so that uvloop being installed or not
does not move the ratios. About 10 s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.bench.loopback import echo_server
from broker.bench.ratios import guard_ratios
from broker.bench.targets import broker_spec
from tests.conftest import BrokerProcess

pytestmark = pytest.mark.backends("memory")

FLOOR_FILE = Path(__file__).resolve().parents[1] / "bench_floor.json"
ROUNDS = 7


def test_ratios_to_an_asyncio_echo_stay_above_the_floor(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    floor = json.loads(FLOOR_FILE.read_text())["floor"]
    daemon = broker_factory(extra_args=("--loop", "asyncio", "--max-capacity", "100000"))
    assert daemon.process is not None
    with echo_server() as echo:
        medians = guard_ratios(broker_spec(daemon.url), daemon.process.pid, echo, ROUNDS)
    print(f"echo CPU per round trip / ours per operation, medians of {ROUNDS} rounds: {medians}")
    below = {name: round(medians[name], 3) for name in floor if medians[name] < floor[name]}
    assert not below, (
        f"below the floor in {FLOOR_FILE.name} ({floor}): {below}; all medians {medians}."
        " A change that slows the message path this much is a regression; if it is meant,"
        " lower the floor in the same commit and say why."
    )
