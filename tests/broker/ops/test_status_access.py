"""Who may read what on the metrics listener: ``/status`` needs the token, or a loopback
peer; ``/metrics`` and the probes answer anyone and name nothing.

The attack of issue 14 ("Unauthenticated surfaces"): ``/status`` (and so ``status`` and
``top``) named channels, clients, peers and namespaces to anyone who reached it. Each
test does what the attacker did, against a daemon process, and finds nothing. (A
``--listen`` beyond loopback without a token is refused at start: ``tests/broker/test_cli.py``.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.layer import BrokerChannelLayer
from tests.broker.http_client import http_get
from tests.conftest import BrokerProcess
from tests.ports import outside_address

TOKEN = "access-test-token-5be1"


def _leave_traces(broker: BrokerProcess, names: dict[str, str], token: str = TOKEN) -> None:
    """A consumer in a group with a pushed message it has not read, and a backlog:
    everything ``/status`` shows, under names only this test uses."""

    async def traffic() -> None:
        layer = BrokerChannelLayer(hosts=[broker.url], token=token, prefix=names["prefix"])
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
    outside = outside_address()
    daemon = BrokerProcess("memory://")
    daemon.extra_args = ("--metrics-listen", f"0.0.0.0:{daemon.metrics_port}")
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


def test_a_token_bound_to_namespaces_sees_only_those_in_status(tmp_path: Path) -> None:
    """1. Two sites on one daemon (``--token-file``), each with a backlog and a client.
    2. Each site's token reads /status: its own channels and clients only.  3. The
    operator's ``*`` token reads both.  4. A token the file drops (SIGHUP) reads nothing."""
    tokens = tmp_path / "tokens"
    grants = {"site-a": "tok-a-31c9", "site-b": "tok-b-82f0"}
    lines = [f"{token} {site}" for site, token in grants.items()] + ["tok-op-5d1e *"]
    tokens.write_text("\n".join(lines) + "\n")
    daemon = BrokerProcess("memory://", extra_args=("--token-file", str(tokens)))
    daemon.start()
    try:
        for site, token in grants.items():
            _leave_traces(daemon, {"prefix": site, "group": "room", "channel": f"{site}-q"}, token)
        for site, token in grants.items():
            document = _document(daemon, token)
            assert [row["channel"] for row in document["top_channels"]] == [f"{site}-q"]
            assert {row["namespace"] for row in document["top_clients"]} <= {site}
        shown = {row["namespace"] for row in _document(daemon, "tok-op-5d1e")["top_channels"]}
        assert shown == set(grants)
        tokens.write_text(lines[0] + "\n" + lines[2] + "\n")
        assert daemon.process is not None
        os.kill(daemon.process.pid, signal.SIGHUP)
        daemon.wait_for_log(lambda line: "SIGHUP: 2 tokens" in line)
        assert _status(daemon, grants["site-b"])[0] == 401
    finally:
        daemon.cleanup()


def _document(broker: BrokerProcess, token: str) -> dict[str, Any]:
    code, body = _status(broker, token)
    assert code == 200, body
    document: dict[str, Any] = json.loads(body)
    return document
