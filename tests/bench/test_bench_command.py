"""``channels-broker bench`` as a user runs it, at tiny sizes: the scenarios added for
issue 17 run, verify and land in the JSON file; a peer that is not there is one clear
note, not a failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.ports import free_port

#: Ports nothing listens on: the peers' columns must be left out, each with a note.
NO_REDIS = f"redis://127.0.0.1:{free_port()}/0"
NO_NATS = f"nats://127.0.0.1:{free_port()}"
SCENARIOS = ("stream", "workers", "stream-windowed", "big-room", "memory")


def run_bench(json_path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "broker", "bench", "--loop", "uvloop", "--scale", "0.02"]
    command += ["--room-channels", "200", "--room-processes", "2", "--room-sends", "3"]
    command += ["--memory-scale", "0.001", "--redis-url", NO_REDIS, "--nats-url", NO_NATS]
    command += [arg for name in SCENARIOS for arg in ("--scenario", name)]
    command += ["--json", str(json_path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=110)


def test_the_new_scenarios_run_and_verify_and_are_written_as_json(tmp_path: Path) -> None:
    json_path = tmp_path / "bench.json"
    finished = run_bench(json_path)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    report = json.loads(json_path.read_text())
    assert report["targets"] == ["broker (memory)"]
    assert not report["errors"], report["errors"]
    rows = {row["metric"]: row["values"]["broker (memory)"] for row in report["rows"]}
    assert {"stream", "workers x4", "big room", "memory: per group membership"} <= set(rows)
    assert any("not application-like" in metric for metric in rows)
    assert rows["big room"] > 0 and rows["big room p99 latency"] >= rows["big room p50 latency"]
    assert rows["big room server RSS after"] > 1  # MiB, read from /proc
    assert rows["memory: per channel with a waiting message"] > 0
    assert report["sizes"]["memory_memberships"] == 10 * report["sizes"]["memory_channels"]
    notes = "\n".join(report["notes"])
    assert f"channels_redis omitted: Redis at {NO_REDIS} did not answer" in notes
    assert "channels-nats omitted:" in notes  # not installed, or no NATS server there
    assert "asyncio loopback echo" in notes
    assert "big room p50 latency" in finished.stdout  # the table, as well as the file
