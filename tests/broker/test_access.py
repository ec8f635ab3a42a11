"""Quiet by default: what a daemon shows, and to whom, before anyone proves anything.

The attacks of issue 14 ("Unauthenticated surfaces"): ``/status`` (and so ``status``
and ``top``) named channels, clients, peers and namespaces to anyone; ``--listen
0.0.0.0`` and ``--metrics-listen 0.0.0.0`` with no token started without a word.
Each test does what the attacker did, against a daemon process, and finds nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.config import Config
from broker.daemon import Server
from broker.layer.channel_layer import BrokerChannelLayer
from tests.broker.http_client import http_get
from tests.conftest import BrokerProcess, free_port

TOKEN = "access-test-token-5be1"
#: Seconds a daemon may take to refuse its options and exit.
EXIT_TIMEOUT_S = 10.0


def _outside_address() -> str:
    """An address of this machine other hosts could reach: where an attacker's packets
    arrive. (A UDP "connect" sends nothing; it only picks the outgoing interface.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never answered, only routed
            address: str = probe.getsockname()[0]
        except OSError:
            address = socket.gethostbyname(socket.gethostname())
    if address.startswith("127."):
        pytest.fail("this machine has no address but loopback: nothing to attack from")
    return address


def _leave_traces(broker: BrokerProcess, names: dict[str, str]) -> None:
    """A consumer in a group with a pushed message it has not read, and a backlog:
    everything ``/status`` shows, under names only this test uses."""

    async def traffic() -> None:
        layer = BrokerChannelLayer(hosts=[broker.url], token=TOKEN, prefix=names["prefix"])
        try:
            channel = await layer.new_channel()
            names["client"] = channel.split(".", 1)[1].split("!", 1)[0]
            await layer.group_add(names["group"], channel)
            await layer.group_send(names["group"], {"type": "x"})
            await layer.send(names["channel"], {"type": "y"})
            await layer.send(names["channel"], {"type": "z"})
        finally:
            await layer.close()

    asyncio.run(traffic())


@pytest.fixture(scope="module")
def guarded() -> Iterator[BrokerProcess]:
    """A memory:// daemon with a token."""
    process = BrokerProcess("memory://", token=TOKEN)
    process.start()
    yield process
    process.cleanup()


def _status(broker: BrokerProcess, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return http_get(broker.metrics_port, "/status", headers=headers)


def test_status_needs_the_token_of_a_daemon_that_has_one(guarded: BrokerProcess) -> None:
    """1. Traffic under names of this test.  2. GET /status with no token, a wrong one,
    another scheme: 401, and the body names none of those names.  3. With the token:
    the document, names and all."""
    names = {"prefix": "tenant-7f3a", "group": "room-c41d", "channel": "backlog-9e2b"}
    _leave_traces(guarded, names)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        code, body = http_get(guarded.metrics_port, "/status", headers=headers)
        assert code == 401, body
        assert b"token" in body
        for name in names.values():
            assert name.encode() not in body
    code, body = _status(guarded, TOKEN)
    assert code == 200
    document = json.loads(body)
    rows = {row["channel"]: row for row in document["top_channels"]}
    assert rows[names["channel"]]["namespace"] == names["prefix"]
    guarded.wait_for_log(lambda line: "refused /status to 127.0.0.1" in line)
    assert TOKEN not in guarded.stderr_text()


def test_metrics_and_probes_answer_anyone_and_name_nothing(guarded: BrokerProcess) -> None:
    """Prometheus and probes ask without a token: /metrics, /healthz and /readyz answer,
    and nothing in them names a channel, group, namespace, client or peer."""
    names = {"prefix": "tenant-2d8c", "group": "room-61fa", "channel": "backlog-e07b"}
    _leave_traces(guarded, names)
    for path in ("/metrics", "/healthz", "/readyz"):
        code, body = http_get(guarded.metrics_port, path)
        assert code == 200, (path, body)
        for name in names.values():
            assert name.encode() not in body, (path, name)
        assert b"127.0.0.1" not in body, path  # no peer address either
    code, metrics = http_get(guarded.metrics_port, "/metrics")
    assert b"channels_broker_messages_accepted_total" in metrics, "the scrape is real"


def _cli(broker: BrokerProcess, *args: str, token: str | None = None) -> Any:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHANNELS")}
    if token is not None:
        env["CHANNELS_BROKER_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "broker", *args,
         "--metrics-listen", f"127.0.0.1:{broker.metrics_port}"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip


def test_status_and_top_pass_the_token_from_the_environment(guarded: BrokerProcess) -> None:
    refused = _cli(guarded, "status", "--json")
    assert refused.returncode == 1
    assert "needs the daemon's token" in refused.stderr
    assert "CHANNELS_BROKER_TOKEN" in refused.stderr
    wrong = _cli(guarded, "status", "--json", "--token", "wrong")
    assert wrong.returncode == 1, wrong.stdout
    shown = _cli(guarded, "status", "--json", token=TOKEN)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["ready"]["ready"] is True
    screens = _cli(guarded, "top", "--count", "1", token=TOKEN)
    assert screens.returncode == 0, screens.stderr
    assert "top channels by backlog" in screens.stdout
    assert _cli(guarded, "check").returncode == 0, "/readyz needs no token"


def test_status_of_a_daemon_without_token_answers_loopback_only() -> None:
    """1. A daemon with no token, its metrics listener on every address.  2. /status from
    this machine's outside address: 403.  3. From loopback: the document.  4. /metrics
    from outside: served (Prometheus scrapes from other hosts)."""
    outside = _outside_address()
    daemon = BrokerProcess("memory://")
    daemon.args = ["--metrics-listen", f"0.0.0.0:{daemon.metrics_port}"]
    daemon.start()
    try:
        code, body = http_get(daemon.metrics_port, "/status", host=outside)
        assert code == 403, body
        assert b"loopback" in body
        assert http_get(daemon.metrics_port, "/status")[0] == 200
        assert http_get(daemon.metrics_port, "/metrics", host=outside)[0] == 200
        daemon.wait_for_log(lambda line: f"refused /status to {outside}" in line)
        daemon.wait_for_log(lambda line: "/status to loopback only" in line)
    finally:
        daemon.cleanup()


def _serve(*args: str, token: str | None = None) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHANNELS")}
    if token is not None:
        env["CHANNELS_BROKER_TOKEN"] = token
    return subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--metrics-listen", "off", *args],
        env=env,
        stderr=subprocess.PIPE,
    )


def test_listening_beyond_loopback_without_token_is_refused_at_start() -> None:
    """``--listen 0.0.0.0`` with no token, token file or client CA: exit 2 with the
    flags that would allow it, and nothing listens meanwhile."""
    port = free_port()
    for listen in (f"0.0.0.0:{port}", f"[::]:{port}", f"{_outside_address()}:{port}"):
        process = _serve("--listen", "127.0.0.1:0", "--listen", listen)
        _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
        assert process.returncode == 2, stderr
        message = stderr.decode()
        assert f"--listen {listen} is reachable from other hosts" in message
        for flag in ("--token", "--token-file", "--tls-client-ca", "--allow-unauthenticated"):
            assert flag in message
        assert "Traceback" not in message
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.parametrize(
    ("args", "token", "warned"),
    [
        (("--allow-unauthenticated",), None, True),
        ((), TOKEN, False),
    ],
    ids=["allow-unauthenticated", "token"],
)
def test_listening_beyond_loopback_starts_when_clients_prove_who_they_are_or_are_allowed_not_to(
    args: tuple[str, ...], token: str | None, warned: bool
) -> None:
    port = free_port()
    process = _serve("--listen", f"0.0.0.0:{port}", *args, token=token)
    try:
        _wait_listening(process, port)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
    assert process.returncode == 0, stderr
    assert ("serves any client that reaches it" in stderr.decode()) is warned


def _wait_listening(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the daemon exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    pytest.fail(f"nothing listens on {port}")


async def test_a_token_bound_to_a_namespace_sees_only_that_namespace_in_status() -> None:
    """The scope /status is built for (a --token-file token's namespace): two sites on
    one daemon, each with a backlog and a slow consumer; each scope lists its own rows
    only, and the daemon's own token lists both."""
    port = free_port()
    server = Server(Config(listen=(f"127.0.0.1:{port}",), metrics_listen=None))
    await server.start()
    layers = [
        BrokerChannelLayer(hosts=[f"tcp://127.0.0.1:{port}"], prefix=prefix)
        for prefix in ("site-a", "site-b")
    ]
    try:
        for layer in layers:
            await layer.send(f"{layer.prefix}-backlog", {"type": "x"})
            mine = await layer.new_channel()
            await layer.send(mine, {"type": "pushed, never read"})
        for scope, others in (("site-a", {"site-b"}), ("site-b", {"site-a"})):
            document = await server.exporter.status(scope)
            channels = document["top_channels"]
            clients = document["top_clients"]
            assert isinstance(channels, list) and isinstance(clients, list)
            assert [row["channel"] for row in channels] == [f"{scope}-backlog"]
            assert {row["namespace"] for row in clients} == {scope}
            assert not others & {row["namespace"] for row in [*channels, *clients]}
        everything = await server.exporter.status()
        assert isinstance(everything["top_channels"], list)
        assert {row["namespace"] for row in everything["top_channels"]} == {"site-a", "site-b"}
    finally:
        for layer in layers:
            await layer.close()
        await server.shutdown()
