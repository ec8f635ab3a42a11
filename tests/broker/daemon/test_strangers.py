"""Peers that do not speak the broker's protocol at all: an HTTP client gets an HTTP 400
that says where the metrics are, a TLS client on a plain port is told what to change, and
the log says so in words (once a minute per kind, not once per connection), never as a
frame of 1,195,725,856 bytes (``GET `` read as a length)."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest

from protocol import FrameDecoder, Welcome
from tests.broker.raw_client import hello
from tests.waits import DELIVERY_TIMEOUT_S

#: What the daemon runs on does not matter here: one daemon, on memory://.
pytestmark = pytest.mark.backends("memory")


def _exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data``, then read all the daemon writes until it closes."""
    with socket.create_connection(address, timeout=DELIVERY_TIMEOUT_S) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _log_lines(broker: Any, needle: str) -> list[str]:
    return [line for line in broker.stderr_text().splitlines() if needle in line]


def test_an_http_request_is_answered_in_http_and_logged_once_a_minute(broker: Any) -> None:
    """1. curl's request to the broker port, twice.  2. Each gets an HTTP 400 naming the
    metrics address, then a close.  3. One log line says an HTTP client spoke, with the
    metrics URL; none says "frame of ... bytes".  4. A layer's HELLO is still welcome."""
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8\r\n\r\n"
    metrics = f"http://127.0.0.1:{broker.metrics_port}/metrics"
    for _ in range(2):
        answer = _exchange(broker.address, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert f"Content-Length: {len(body)}".encode() in head
        assert metrics.encode() in body
    line = broker.wait_for_log(lambda line: "an HTTP client" in line)
    assert "spoke to the broker port" in line and f"metrics are on {metrics}" in line
    assert len(_log_lines(broker, "an HTTP client")) == 1, "the second is counted, not logged"
    assert not _log_lines(broker, "1195725856")
    frames = FrameDecoder()
    with socket.create_connection(broker.address, timeout=DELIVERY_TIMEOUT_S) as sock:
        sock.sendall(hello())
        while (frame := frames.next_frame()) is None:
            frames.receive_data(sock.recv(65536))
    assert isinstance(frame, Welcome)


def test_a_tls_client_on_a_plain_port_is_told_what_to_change(broker: Any) -> None:
    """A layer with tls:// against a plain TCP daemon: its handshake fails, and the log
    says a TLS client spoke to a plain port and which settings to change."""
    context = ssl.create_default_context()
    with (
        socket.create_connection(broker.address, timeout=DELIVERY_TIMEOUT_S) as sock,
        pytest.raises((ssl.SSLError, OSError)),
    ):
        context.wrap_socket(sock, server_hostname="127.0.0.1")
    line = broker.wait_for_log(lambda line: "a TLS client" in line)
    assert "plain TCP broker port" in line and "--tls-cert" in line and "tcp://" in line
    assert "protocol error" not in line
