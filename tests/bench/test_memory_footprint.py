"""What the memory backend's daemon holds per channel and per membership, read from its
RSS by the bench's memory scenario (200,000 memberships: large enough that the RSS read
is not noise, small enough for seconds).

The bounds are what issue 17 needs of the full size (1,000,000 channels with a waiting
message and 10,000,000 memberships in 1.5 GiB) with some margin: a channel's name held
once by all its memberships (interned) and deadlines shared by the memberships made in
one step (backends.deadlines) are what bring a membership under it; each copy of the
name or float per membership is 24-70 bytes more.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port

pytestmark = pytest.mark.slow

#: Bytes the daemon may hold per membership and per channel with one waiting message.
MEMBERSHIP_BYTES_MAX = 100
CHANNEL_BYTES_MAX = 900


def test_a_membership_and_a_channel_cost_the_daemon_little(tmp_path: Path) -> None:
    json_path = tmp_path / "memory.json"
    command = [sys.executable, "-m", "broker", "bench", "--loop", "uvloop"]
    command += ["--scenario", "memory", "--memory-scale", "0.02", "--json", str(json_path)]
    command += ["--redis-url", f"redis://127.0.0.1:{free_port()}/0"]
    command += ["--nats-url", f"nats://127.0.0.1:{free_port()}"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    report = json.loads(json_path.read_text())
    rows = {row["metric"]: row["values"]["broker (memory)"] for row in report["rows"]}
    assert 0 < rows["memory: per group membership"] < MEMBERSHIP_BYTES_MAX, rows
    assert 0 < rows["memory: per channel with a waiting message"] < CHANNEL_BYTES_MAX, rows
