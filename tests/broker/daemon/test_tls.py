"""TLS both ways: ``--tls-client-ca`` (mutual TLS), client certificates in the layer's
``ssl_context``, and TLS failures reported as what they are, at once.

Certificates are made for each run (``tests.certificates``): a CA that signs the
daemon's certificate and the workers', and another CA, a stranger's, that signs a
client certificate and an impostor daemon's.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync

from broker.layer import (
    BrokerCertificateNotTrusted,
    BrokerChannelLayer,
    BrokerHostnameMismatch,
    BrokerTimeout,
    BrokerTLSError,
    BrokerUnavailable,
)
from broker.layer.sync import layer_for
from protocol import PROTOCOL_VERSION, FrameDecoder, Hello, Ping, Pong, Welcome, encode_frame
from tests.broker.http_client import http_get
from tests.certificates import Authority, Issued
from tests.conftest import BrokerProcess
from tests.waits import DELIVERY_TIMEOUT_S

#: A TLS failure is reported within this, though the layer would wait 5 s for a daemon.
AT_ONCE_S = 1.0
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Pki:
    ca: Authority
    daemon: Issued
    worker: Issued
    #: Signed by another CA: a client certificate and a daemon certificate.
    stranger: Issued
    impostor: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Authority(directory), Authority(directory, "other-ca")
    return Pki(
        ca=ca,
        daemon=ca.server("127.0.0.1", name="daemon"),
        worker=ca.client("worker"),
        stranger=other.client("stranger"),
        impostor=other.server("127.0.0.1", name="impostor"),
    )


def _tls_args(server: Issued, client_ca: Path | None) -> tuple[str, ...]:
    args = ("--tls-cert", str(server.cert), "--tls-key", str(server.key))
    return args + (("--tls-client-ca", str(client_ca)) if client_ca else ())


@pytest.fixture(scope="module")
def mtls(pki: Pki) -> Iterator[BrokerProcess]:
    """A daemon that requires client certificates its CA signed."""
    process = BrokerProcess("memory://", extra_args=_tls_args(pki.daemon, pki.ca.cert))
    process.start()
    yield process
    process.cleanup()


def tls_url(broker: BrokerProcess, host: str = "127.0.0.1") -> str:
    return f"tls://{host}:{broker.port}"


def context(pki: Pki, client: Issued | None = None) -> ssl.SSLContext:
    """What a site writes in CONFIG: trust our CA; show ``client``'s certificate, if any."""
    made = ssl.create_default_context(cafile=str(pki.ca.cert))
    if client is not None:
        made.load_cert_chain(client.cert, client.key)
    return made


def _dial(broker: BrokerProcess, client: ssl.SSLContext) -> ssl.SSLSocket:
    """A blocking TLS socket to ``broker``, its handshake done (as far as a TLS 1.3
    client can tell: the daemon checks the client's certificate after that)."""
    raw = socket.create_connection(broker.address, timeout=DELIVERY_TIMEOUT_S)
    try:
        return client.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def _hello_and_ping(sock: ssl.SSLSocket) -> list[object]:
    """Say HELLO and PING; the frames the daemon answers before it closes."""
    hello = Hello(PROTOCOL_VERSION, "", "", "asgi", 100, 60.0, 86400.0)
    frames: list[object] = []
    decoder = FrameDecoder()
    try:
        sock.sendall(encode_frame(hello) + encode_frame(Ping(7)))
        while len(frames) < 2 and (data := sock.recv(65536)):
            decoder.receive_data(data)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    except (ssl.SSLError, ConnectionError):
        pass  # the daemon's refusal: an alert, or the connection closed under us
    return frames


def _hellos_handled(broker: BrokerProcess) -> float:
    _, body = http_get(broker.metrics_port, "/metrics")
    pattern = rb'channels_broker_operation_duration_seconds_count\{operation="hello"\} (\S+)'
    found = re.search(pattern, body)
    assert found, "the HELLO histogram is exported"
    return float(found.group(1))


@pytest.mark.parametrize("certificate", ["none", "stranger"])
def test_a_client_without_a_certificate_of_the_ca_is_refused_before_hello(
    pki: Pki, mtls: BrokerProcess, certificate: str
) -> None:
    """1. A raw TLS client, with no certificate or one another CA signed, says HELLO and
    PING.  2. It gets no WELCOME, no PONG: the daemon never handled that HELLO (its HELLO
    count is unchanged), and logged the refusal with the peer and why.  3. A worker with
    its certificate is served meanwhile."""
    before = _hellos_handled(mtls)
    client = context(pki, None if certificate == "none" else pki.stranger)
    with _dial(mtls, client) as sock:
        port = sock.getsockname()[1]
        assert _hello_and_ping(sock) == []
    reason = "peer did not return a certificate" if certificate == "none" else "verify failed"
    mtls.wait_for_log(lambda line: f"127.0.0.1:{port} refused: " in line and reason in line)
    with _dial(mtls, context(pki, pki.worker)) as sock:
        answered = _hello_and_ping(sock)
    assert [type(frame) for frame in answered] == [Welcome, Pong]
    assert _hellos_handled(mtls) == before + 1, "only the worker's HELLO was read"
    _, metrics = http_get(mtls.metrics_port, "/metrics")
    refused = re.search(rb"^channels_broker_tls_refused_total (\S+)$", metrics, re.MULTILINE)
    assert refused and float(refused.group(1)) >= 1


def test_a_layer_with_its_client_certificate_is_served_also_from_sync_code(
    pki: Pki, mtls: BrokerProcess
) -> None:
    """The certificate goes in CONFIG's ``ssl_context``. Calls from sync code, each in a
    fresh event loop, work every time (a TLS connection is not handed between loops)."""
    layer = BrokerChannelLayer(hosts=[tls_url(mtls)], ssl_context=context(pki, pki.worker))
    for index in range(4):
        async_to_sync(layer.send)("mtls-sync", {"index": index})
    received = [async_to_sync(layer.receive)("mtls-sync")["index"] for _ in range(4)]
    assert received == [0, 1, 2, 3]


def test_sync_calls_use_the_layers_ssl_context_and_say_why_tls_failed(
    pki: Pki, mtls: BrokerProcess
) -> None:
    """``broker.layer.sync`` opens TLS with the layer's ``ssl_context``: served with the
    worker's certificate; refused at once, saying why, without one or with a stranger's,
    and when the daemon's certificate is not trusted."""
    layer = BrokerChannelLayer(hosts=[tls_url(mtls)], ssl_context=context(pki, pki.worker))
    worker = layer_for(layer)
    for index in range(3):
        worker.send("mtls-sync-native", {"index": index})
    worker.close()
    received = [async_to_sync(layer.receive)("mtls-sync-native")["index"] for _ in range(3)]
    assert received == [0, 1, 2]
    refusals = [
        ({"ssl_context": context(pki)}, "requires a client certificate"),
        ({"ssl_context": context(pki, pki.stranger)}, "requires a client certificate"),
        ({}, "certificate is not trusted"),
    ]
    for config, reason in refusals:
        refused = BrokerChannelLayer(
            hosts=[tls_url(mtls)], connect_timeout=CONNECT_TIMEOUT_S, **config
        )
        started = time.monotonic()
        with pytest.raises(BrokerTLSError, match=reason):
            layer_for(refused).send("tls-refused", {"n": 1})
        assert time.monotonic() - started < AT_ONCE_S


def _fails_at_once(**config: object) -> BrokerTLSError:
    async def send() -> None:
        layer = BrokerChannelLayer(connect_timeout=CONNECT_TIMEOUT_S, **config)
        try:
            await layer.send("tls-refused", {"n": 1})
        finally:
            await layer.close()

    started = time.monotonic()
    with pytest.raises(BrokerTLSError) as failed:
        asyncio.run(send())
    elapsed = time.monotonic() - started
    assert elapsed < AT_ONCE_S, f"reported after {elapsed:.2f} s, as a timeout would be"
    assert isinstance(failed.value, BrokerUnavailable), "code catching BrokerUnavailable still does"
    return failed.value


def test_a_missing_client_certificate_is_reported_at_once(pki: Pki, mtls: BrokerProcess) -> None:
    for client in (None, pki.stranger):
        error = _fails_at_once(hosts=[tls_url(mtls)], ssl_context=context(pki, client))
        assert "requires a client certificate" in str(error)
        assert "load_cert_chain" in str(error)


def test_an_untrusted_daemon_certificate_is_reported_at_once(mtls: BrokerProcess) -> None:
    """No ssl_context: the system's CAs, which never signed ours."""
    error = _fails_at_once(hosts=[tls_url(mtls)])
    assert isinstance(error, BrokerCertificateNotTrusted)
    assert "certificate is not trusted" in str(error)
    assert "cafile" in str(error)


def test_a_hostname_mismatch_is_reported_at_once(pki: Pki, mtls: BrokerProcess) -> None:
    """The daemon's certificate names 127.0.0.1; ``hosts`` says localhost."""
    error = _fails_at_once(hosts=[tls_url(mtls, "localhost")], ssl_context=context(pki, pki.worker))
    assert isinstance(error, BrokerHostnameMismatch)
    assert "hostname mismatch" in str(error)
    assert "must name the host written in `hosts`" in str(error)


def test_tls_to_a_daemon_without_tls_is_reported_at_once(pki: Pki) -> None:
    plain = BrokerProcess("memory://")
    plain.start()
    try:
        error = _fails_at_once(hosts=[tls_url(plain)], ssl_context=context(pki, pki.worker))
    finally:
        plain.cleanup()
    assert "does not speak TLS" in str(error)


def test_a_daemon_that_does_not_answer_is_a_timeout(pki: Pki) -> None:
    """A TLS daemon stopped (SIGSTOP): the kernel still accepts the connection, but the
    handshake gets no answer. The send raises BrokerTimeout after connect_timeout,
    naming the host and what to check; the daemon, continued, serves again."""
    daemon = BrokerProcess("memory://", extra_args=_tls_args(pki.daemon, None))
    daemon.start()
    assert daemon.process is not None
    layer_config = {"hosts": [tls_url(daemon)], "ssl_context": context(pki)}

    async def send() -> None:
        layer = BrokerChannelLayer(connect_timeout=0.5, **layer_config)
        try:
            await layer.send("no-answer", {"n": 1})
        finally:
            await layer.close()

    daemon.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(BrokerTimeout) as failed:
            asyncio.run(send())
        assert 0.5 <= time.monotonic() - started < 0.5 + AT_ONCE_S
    finally:
        daemon.process.send_signal(signal.SIGCONT)
    assert isinstance(failed.value, BrokerUnavailable)
    assert f"no answer from {tls_url(daemon)} within 0.5 s" in str(failed.value)
    assert "raise connect_timeout" in str(failed.value)
    try:
        asyncio.run(send())  # answered now
    finally:
        daemon.cleanup()


async def test_a_waiting_receiver_rides_a_tls_restart_and_hears_of_an_impostor(
    pki: Pki,
) -> None:
    """1. A consumer waits on its own channel over mutual TLS.  2. The daemon restarts
    with its own certificate: the consumer reconnects and gets a message sent after.
    3. It restarts with a certificate another CA signed: the waiting receive raises
    ``BrokerTLSError`` instead of waiting for ever."""
    daemon = BrokerProcess("memory://", extra_args=_tls_args(pki.daemon, pki.ca.cert))
    daemon.start()
    layer = BrokerChannelLayer(hosts=[tls_url(daemon)], ssl_context=context(pki, pki.worker))
    try:
        channel = await layer.new_channel()
        waiting = asyncio.ensure_future(layer.receive(channel))
        await layer.send(channel, {"n": 1})
        assert (await asyncio.wait_for(waiting, DELIVERY_TIMEOUT_S)) == {"n": 1}
        waiting = asyncio.ensure_future(layer.receive(channel))
        await asyncio.to_thread(daemon.restart)
        await layer.send(channel, {"n": 2})
        assert (await asyncio.wait_for(waiting, DELIVERY_TIMEOUT_S)) == {"n": 2}
        waiting = asyncio.ensure_future(layer.receive(channel))
        await asyncio.to_thread(daemon.stop)
        daemon.extra_args = _tls_args(pki.impostor, pki.ca.cert)
        await asyncio.to_thread(daemon.start)
        with pytest.raises(BrokerTLSError, match="not trusted"):
            await asyncio.wait_for(waiting, DELIVERY_TIMEOUT_S)
    finally:
        await layer.close()
        daemon.cleanup()


def test_handshakes_that_never_finish_count_against_the_connection_bounds(pki: Pki) -> None:
    """1. Three sockets to a TLS port that never start their handshake, with
    --max-connections-per-peer 3.  2. A worker with its certificate from the same
    address is refused at once (logged, counted), not left to find the daemon out of
    file descriptors.  3. The three go: the worker is served.  4. A socket that never
    starts its handshake is closed at the HELLO deadline."""
    bounds = ("--max-connections-per-peer", "3", "--hello-timeout", "1")
    daemon = BrokerProcess("memory://", extra_args=(*_tls_args(pki.daemon, None), *bounds))
    daemon.start()
    daemon.wait_for_log(lambda line: "did not finish" in line)  # the start's own probe
    idle = [socket.create_connection(daemon.address, timeout=DELIVERY_TIMEOUT_S) for _ in range(3)]
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _dial(daemon, context(pki, pki.worker)).close()  # closed before a TLS byte
        daemon.wait_for_log(lambda line: "--max-connections-per-peer" in line)
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while True:  # the daemon sees the three go as their handshakes fail
            try:
                with _dial(daemon, context(pki, pki.worker)) as sock:
                    if [type(f) for f in _hello_and_ping(sock)] == [Welcome, Pong]:
                        break
            except (ssl.SSLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the idle sockets' places were not given back"
        started = time.monotonic()
        with socket.create_connection(daemon.address, timeout=DELIVERY_TIMEOUT_S) as silent:
            assert silent.recv(1) == b""
        assert time.monotonic() - started < 1 + AT_ONCE_S, "closed at --hello-timeout"
    finally:
        for sock in idle:
            sock.close()
        daemon.cleanup()
