"""Errors say what to do: each failure a user meets, its own class, cause and hint.

A refused connection, a name that does not resolve, a message over the daemon's limit,
a value a message cannot carry. (TLS not trusted, hostname mismatch and a daemon that
does not answer are in ``tests/broker/daemon/test_tls.py``, beside the certificates.)
Every class of connection failure is a ``BrokerUnavailable``: code written for that
still catches it.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync

from broker.layer import (
    BrokerChannelLayer,
    BrokerConnectionRefused,
    BrokerNameNotResolved,
    BrokerUnavailable,
    MessageTooLarge,
    UnserializableMessage,
)
from tests.waits import DELIVERY_TIMEOUT_S

#: What the issue asks of a view when no daemon listens: the error within 100 ms.
REFUSED_WITHIN_S = 0.1
#: connect_timeout of the layer whose connection is reset: a send waits that long for a
#: daemon that was reachable (its connection was the layer's before the reset).
RESET_CONNECT_TIMEOUT_S = 0.5
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "notifications"

pytestmark = pytest.mark.backends("memory")  # the layer's behaviour: any storage will do


def test_a_view_gets_connection_refused_within_100_ms(dead_url: str) -> None:
    """A sync view's ``async_to_sync(layer.send)``, no daemon listening: each call raises
    BrokerConnectionRefused in under 100 ms, the first (a fresh process's) included,
    naming the address and the command that would listen there."""
    layer = BrokerChannelLayer(hosts=[dead_url])
    port = dead_url.rsplit(":", 1)[1]
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(BrokerConnectionRefused) as raised:
            async_to_sync(layer.send)("jobs", {"type": "job"})
        elapsed = time.monotonic() - started
        assert elapsed < REFUSED_WITHIN_S, f"refused after {elapsed * 1000:.0f} ms"
    assert isinstance(raised.value, BrokerUnavailable)
    assert f"connection refused at {dead_url}" in str(raised.value)
    assert f"channels-broker serve --listen 127.0.0.1:{port}" in str(raised.value)


def test_a_missing_unix_socket_is_a_refused_connection(tmp_path: Path) -> None:
    path = tmp_path / "broker.sock"
    layer = BrokerChannelLayer(hosts=[f"unix://{path}"])
    with pytest.raises(BrokerConnectionRefused) as raised:
        async_to_sync(layer.group_send)("room", {"type": "chat.message"})
    assert f"no socket at unix://{path}" in str(raised.value)
    assert f"channels-broker serve --unix {path}" in str(raised.value)


@pytest.mark.parametrize("late_by", range(6))
async def test_a_connection_reset_as_it_is_made_is_a_refused_connection(
    late_by: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon that stops (or is killed) closes its listening socket with a layer's new
    connection in its queue: the kernel resets that connection. However many passes late
    the layer's loop looks at it (``late_by``; a loaded machine), a send raises
    BrokerConnectionRefused: nothing listens there any more. It was a plain
    BrokerUnavailable, "Connect call failed" (ECONNRESET), when the reset came before
    the connect returned; "closed the connection" when it came before the client took
    the connection; and a send waited for ever when it came in between (the connection
    kept, dead, as nothing told it). The outage's log line says so too."""
    listener = socket.create_server(("127.0.0.1", 0))  # a daemon's, which never accepts
    url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    layer = BrokerChannelLayer(hosts=[url], connect_timeout=RESET_CONNECT_TIMEOUT_S)
    sending = asyncio.ensure_future(layer.send("jobs", {"type": "job"}))
    try:
        # Until the layer's connect is in the queue, and then late_by passes of the loop.
        while not select.select([listener], [], [], 0)[0] and not sending.done():
            await asyncio.sleep(0)
        for _ in range(late_by):
            await asyncio.sleep(0)
        listener.close()  # as the daemon's exit does: the queued connection is reset
        with pytest.raises(BrokerConnectionRefused) as raised:
            await asyncio.wait_for(sending, DELIVERY_TIMEOUT_S)
    finally:
        listener.close()
        await layer.close()
    assert f"connection refused at {url}" in str(raised.value)
    down = [r.getMessage() for r in caplog.records if "no broker reachable" in r.getMessage()]
    assert down and all(f"connection refused at {url}" in line for line in down), down


def test_a_host_name_that_does_not_resolve_is_named() -> None:
    """``.invalid`` never resolves (RFC 6761): raised at once, naming the host."""
    layer = BrokerChannelLayer(hosts=["tcp://broker.invalid:7733"])
    started = time.monotonic()
    with pytest.raises(BrokerNameNotResolved) as raised:
        async_to_sync(layer.send)("jobs", {"type": "job"})
    assert time.monotonic() - started < 1.0
    assert isinstance(raised.value, BrokerUnavailable)
    assert "'broker.invalid' of tcp://broker.invalid:7733 does not resolve" in str(raised.value)
    assert "correct `hosts` in CHANNEL_LAYERS" in str(raised.value)


def test_hosts_that_fail_differently_are_each_named(dead_url: str) -> None:
    layer = BrokerChannelLayer(hosts=[dead_url, "tcp://broker.invalid:7733"])
    with pytest.raises(BrokerUnavailable) as raised:
        async_to_sync(layer.send)("jobs", {"type": "job"})
    assert type(raised.value) is BrokerUnavailable
    assert f"connection refused at {dead_url}" in str(raised.value)
    assert "'broker.invalid' of tcp://broker.invalid:7733 does not resolve" in str(raised.value)


async def test_message_too_large_names_the_flag_and_the_sizes(
    broker_factory: Callable[..., Any],
) -> None:
    """The first send, before the daemon's limit is known (the daemon refuses it), and
    the next (the layer refuses it before sending): both name the sizes and the flag."""
    daemon = broker_factory(max_message_bytes=1024)
    layer = BrokerChannelLayer(hosts=[daemon.url])
    try:
        for _ in range(2):
            with pytest.raises(MessageTooLarge) as raised:
                await layer.send("jobs", {"blob": b"x" * 2000})
            text = str(raised.value)
            assert re.match(r"message of 20\d\d bytes is over the (daemon's )?limit of 1024", text)
            assert "--max-message-bytes" in text, text
            assert "nothing was sent" in text
    finally:
        await layer.close()


async def test_message_too_large_for_the_layers_own_cap_names_that_setting(
    broker: Any,
) -> None:
    layer = BrokerChannelLayer(hosts=[broker.url], max_message_bytes=100)
    try:
        with pytest.raises(MessageTooLarge, match="over the limit of 100 bytes") as raised:
            await layer.group_send("room", {"blob": b"x" * 200})
        assert "max_message_bytes sets in the layer's CONFIG" in str(raised.value)
    finally:
        await layer.close()


@pytest.mark.parametrize(
    ("message", "where", "advice"),
    [
        (
            {"when": datetime.datetime(2026, 1, 2, 3, 4, 5)},
            'message["when"] is a datetime.datetime',
            "value.isoformat()",
        ),
        ({"data": {"tags": {"a", "b"}}}, 'message["data"]["tags"] is a set', "sorted(value)"),
        (
            {"rows": [1, [2, decimal.Decimal("3.5")]]},
            'message["rows"][1][1] is a decimal.Decimal',
            "str(value)",
        ),
        ({"n": 2**64}, 'message["n"] is an int of more than 64 bits', "send it as a str"),
        (
            {"by_day": {datetime.date(2026, 1, 2): 3}},
            'message["by_day"] has a key of type datetime.date',
            "isoformat",
        ),
    ],
)
def test_a_value_a_message_cannot_carry_is_named_by_its_key_path(
    dead_url: str, message: dict[str, Any], where: str, advice: str
) -> None:
    """Refused before any I/O (no daemon listens), as a TypeError, as msgpack's was."""
    layer = BrokerChannelLayer(hosts=[dead_url])
    with pytest.raises(UnserializableMessage) as raised:
        async_to_sync(layer.send)("jobs", {"type": "job", **message})
    assert isinstance(raised.value, TypeError)
    assert str(raised.value).startswith(where), str(raised.value)
    assert advice in str(raised.value)


def test_a_model_instance_in_a_message_is_named_with_the_advice_to_send_its_id(
    dead_url: str,
) -> None:
    """A real Django model instance, in the example site's project (its settings, in a
    process of its own, since this one does not configure Django)."""
    code = (
        "import django; django.setup()\n"
        "from asgiref.sync import async_to_sync\n"
        "from channels.layers import get_channel_layer\n"
        "from django.contrib.auth.models import User\n"
        "try:\n"
        "    async_to_sync(get_channel_layer().send)(\n"
        "        'jobs', {'type': 'job', 'user': User(pk=7, username='alice')})\n"
        "except TypeError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "notifications_site.settings"}
    env["CHANNELS_BROKER_URL"] = dead_url
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=EXAMPLE_DIR, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        'UnserializableMessage message["user"] is a django.contrib.auth.models.User'
    ), done.stdout
    assert "send its id (value.pk)" in done.stdout
