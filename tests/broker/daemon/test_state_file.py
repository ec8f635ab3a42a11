"""``--state-file``: a daemon on memory:// stopped by SIGTERM keeps its store on disk.

An upgrade of a single-machine site (``systemctl restart``) must lose nothing: the
waiting messages of normal and process-specific channels, and the group memberships,
come back at the next start, their expiry counting the time the daemon was down. A file
that is not a state file of this version is refused, and so is the flag on a shared
backend (which keeps its own state).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.broker.daemon.traffic import assert_once_in_order
from tests.conftest import REPO_ROOT, BrokerProcess, LayerFactory
from tests.servers import free_port
from tests.waits import QUIET_S, START_TIMEOUT_S, assert_nothing_within, receive

MESSAGES = 50
#: The expiry of the messages that must not come back: over before the daemon restarts.
SHORT_EXPIRY_S = 1


def _metric(broker: BrokerProcess, line_start: str) -> float:
    url = f"http://127.0.0.1:{broker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=START_TIMEOUT_S) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {line_start} in /metrics")


async def _channel_of_a_closed_loop(layer: Any) -> str:
    """A process-specific channel whose owner (another loop of ``layer``) is gone: its
    messages wait in storage, and this loop, of the same family, may pull them."""
    return await asyncio.to_thread(asyncio.run, layer.new_channel())


@pytest.mark.backends("memory")
async def test_sigterm_keeps_waiting_messages_and_memberships_in_the_state_file(
    broker_factory: Callable[..., BrokerProcess], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """1. A daemon with --state-file; 50 messages wait on a normal channel and 50 on a
       process-specific one whose owner is away, 5 with a 1 s expiry on another; a
       group has a member.
    2. SIGTERM: it exits 0 and the file holds them. 1 s later it starts again and reads
       the file back (renamed ``.loaded``), under the same incarnation.
    3. A reader gets the 50 and 50, each once, in order; the short-lived ones expired;
       a group_send reaches the member; /metrics says what came back."""
    state_path = tmp_path / "broker.state"
    broker = broker_factory(extra_args=("--state-file", str(state_path)))
    make_layer = LayerFactory(broker)
    try:
        await _keep_across_sigterm(broker, make_layer, unique, state_path)
    finally:
        await make_layer.aclose()


async def _keep_across_sigterm(
    broker: BrokerProcess, make_layer: LayerFactory, unique: Callable[[str], str], state_path: Path
) -> None:
    sender, short_lived, reader = make_layer(), make_layer(expiry=SHORT_EXPIRY_S), make_layer()
    channels = [unique("work"), await _channel_of_a_closed_loop(reader)]
    short, member, group = unique("short"), unique("member"), unique("room")
    for n in range(MESSAGES):
        for channel in channels:
            await sender.send(channel, {"n": n})
    for n in range(5):
        await short_lived.send(short, {"n": n})
    sent_short_at = time.monotonic()
    await sender.group_add(group, member)
    for layer in (sender, short_lived):
        await layer.close()  # every send confirmed: stored before the daemon stops

    assert await asyncio.to_thread(broker.stop) == 0
    assert state_path.exists()
    await asyncio.sleep(max(0.0, sent_short_at + SHORT_EXPIRY_S + 0.2 - time.monotonic()))
    await asyncio.to_thread(broker.start)

    assert not state_path.exists() and state_path.with_suffix(".state.loaded").exists()
    for channel in channels:
        got = [(await receive(reader, channel))["n"] for _ in range(MESSAGES)]
        assert_once_in_order(got, MESSAGES)
        await assert_nothing_within(reader, channel, QUIET_S)
    await assert_nothing_within(reader, short, QUIET_S)
    await reader.group_send(group, {"after": "restart"})
    assert await receive(reader, member) == {"after": "restart"}
    assert reader.memberships.stores_lost == 0  # the same store: nothing was re-added
    assert _metric(broker, "channels_broker_store_started_empty") == 0
    restored = 'channels_broker_store_restored{what="%s"}'
    assert _metric(broker, restored % "messages") == 2 * MESSAGES
    assert _metric(broker, restored % "memberships") == 1
    assert _metric(broker, restored % "expired") == 5


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    """``channels-broker serve`` that must exit by itself (refused at start)."""
    command = [
        sys.executable, "-m", "broker", "serve",
        "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "off", *args,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=START_TIMEOUT_S
    )


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\x00garbage that is no msgpack map\xff", "is not a channels-broker state file"),
        (msgpack.packb({"format": "something else", "version": 1}), "is not a channels-broker"),
        (
            msgpack.packb({"format": "channels-broker memory state", "version": 99}),
            "state file of version 99",
        ),
        (
            msgpack.packb({"format": "channels-broker memory state", "version": 1, "spaces": {}}),
            "damaged state file",
        ),
    ],
    ids=["garbage", "foreign", "other-version", "damaged"],
)
def test_a_file_that_is_not_a_state_file_is_refused_not_started_empty(
    tmp_path: Path, content: bytes, says: str
) -> None:
    state_path = tmp_path / "broker.state"
    state_path.write_bytes(content)
    done = _serve("--backend", "memory://", "--state-file", str(state_path))
    assert done.returncode == 2, done.stderr
    assert str(state_path) in done.stderr and says in done.stderr, done.stderr
    assert "move it away to start empty" in done.stderr
    assert state_path.read_bytes() == content  # left as it was, for the operator


def test_state_file_with_a_shared_backend_is_refused(tmp_path: Path) -> None:
    done = _serve("--backend", "redis://127.0.0.1:1/0", "--state-file", str(tmp_path / "s"))
    assert done.returncode == 2, done.stderr
    assert "--state-file keeps the memory backend's state; redis://" in done.stderr


def test_a_state_file_in_a_directory_the_daemon_cannot_write_is_refused_at_start(
    tmp_path: Path,
) -> None:
    """Found at start, not at SIGTERM, when the store would be lost for it."""
    path = tmp_path / "missing" / "broker.state"
    done = _serve("--backend", "memory://", "--state-file", str(path))
    assert done.returncode == 2, done.stderr
    assert f"cannot write {path}" in done.stderr, done.stderr
