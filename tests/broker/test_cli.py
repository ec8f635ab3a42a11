"""``channels-broker serve`` as a user runs it: options, environment, TOML file, signals."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocol import FrameDecoder, Ping, Pong, Welcome, encode_frame
from tests.broker.raw_client import hello
from tests.ports import free_port, free_ports, outside_address
from tests.waits import POLL_S, START_TIMEOUT_S


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "broker", "serve", "--metrics-listen", "off", *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(command, env=full_env, stderr=subprocess.PIPE)


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            pytest.fail(f"daemon exited with {process.returncode}: {stderr}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(POLL_S)
    pytest.fail(f"nothing listens on port {port}")


def _stop(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=START_TIMEOUT_S)
    return process.returncode, stderr.decode()


@dataclass
class Served:
    """The daemon of a ``serving`` block; its stderr is there once the block is over."""

    process: subprocess.Popen[bytes]
    stderr: str = ""


@contextlib.contextmanager
def serving(port: int, *args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """``serve *args`` for the block, once it listens on ``port``; then SIGTERM, on which
    it must exit 0."""
    served = Served(_serve(*args, env=env))
    try:
        _wait_listening(port, served.process)
        yield served
    finally:
        code, served.stderr = _stop(served.process)
    assert code == 0, served.stderr


def _refused(*args: str) -> tuple[int, str]:
    """Exit code and stderr of a ``serve *args`` expected to refuse to start."""
    process = _serve(*args)
    _, stderr = process.communicate(timeout=START_TIMEOUT_S)
    return process.returncode, stderr.decode()


def _ping(port: int) -> Pong:
    """HELLO then PING over a raw socket; the daemon's answer to the PING."""
    with socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT_S) as sock:
        sock.sendall(hello() + encode_frame(Ping(7)))
        decoder = FrameDecoder()
        frames: list[object] = []
        while len(frames) < 2:
            decoder.receive_data(sock.recv(65536))
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    assert isinstance(frames[0], Welcome)
    assert isinstance(frames[1], Pong)
    return frames[1]


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    """1. The file names one port, the environment another, the flag a third.
    2. Each run listens where the highest-precedence source says."""
    file_port, env_port, flag_port = free_ports(3)
    config = tmp_path / "broker.toml"
    config.write_text(f'listen = ["127.0.0.1:{file_port}"]\nlog-format = "json"\n')
    runs = [
        ((), {"CHANNELS_BROKER_CONFIG": str(config)}, file_port),
        (
            (),
            {
                "CHANNELS_BROKER_CONFIG": str(config),
                "CHANNELS_BROKER_LISTEN": f"127.0.0.1:{env_port}",
            },
            env_port,
        ),
        (
            ("--listen", f"127.0.0.1:{flag_port}"),
            {
                "CHANNELS_BROKER_CONFIG": str(config),
                "CHANNELS_BROKER_LISTEN": f"127.0.0.1:{env_port}",
            },
            flag_port,
        ),
    ]
    for args, env, expected_port in runs:
        with serving(expected_port, *args, env=env) as served:
            assert _ping(expected_port).request_id == 7
        assert f"listening on tcp://127.0.0.1:{expected_port}" in served.stderr
        assert '"level": "info"' in served.stderr, "log-format from the file applies in every run"


def test_sigterm_stops_cleanly_with_a_client_connected() -> None:
    """1. A client is connected and idle.  2. SIGTERM.  3. Exit code 0, "stopped" logged,
    and the client sees its connection closed."""
    port = free_port()
    with serving(port, "--listen", f"127.0.0.1:{port}") as served:
        client = socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT_S)
        client.sendall(hello())
        assert client.recv(65536), "WELCOME expected"
    assert "stopped" in served.stderr
    assert client.recv(65536) == b"", "the daemon closes client connections on shutdown"
    client.close()


def _connect_once_listening(sock: socket.socket, path: Path) -> None:
    """Connect to the daemon's unix socket, which it opens after its TCP port."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            sock.connect(str(path))
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)


def test_unix_socket_listener_serves_and_is_removed_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "broker.sock"
    port = free_port()
    with (
        serving(port, "--listen", f"127.0.0.1:{port}", "--unix", str(path)),
        socket.socket(socket.AF_UNIX) as sock,
    ):
        _connect_once_listening(sock, path)
        sock.sendall(hello())
        assert sock.recv(65536)
    assert not path.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--listen", "nonsense"), "'nonsense' is not host:port"),
        (("--backend", "carrier-pigeon://coop"), "unknown backend"),
        (("--max-message-bytes", "10"), "--max-message-bytes must be between"),
        (("--log-level", "loud"), "'loud' is not one of"),
        (("--token", "s3cret", "--token-file", "/etc/hosts"), "not both"),
        (("--token-file", "/nonexistent/tokens"), "cannot read the token file"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(
    args: tuple[str, ...], message: str
) -> None:
    code, stderr = _refused(*args)
    assert code != 0
    assert message in stderr
    assert "Traceback" not in stderr


def test_tls_listener_serves_a_layer_that_trusts_its_certificate(tmp_path: Path) -> None:
    """1. A self-signed certificate for 127.0.0.1.  2. The daemon listens with it.
    3. A layer with tls:// and a context trusting that certificate sends and receives."""
    import asyncio
    import ssl

    from broker.layer import BrokerChannelLayer

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    with serving(port, "--listen", f"127.0.0.1:{port}", *tls) as served:
        context = ssl.create_default_context(cafile=str(cert))

        async def round_trip() -> dict[str, object]:
            layer = BrokerChannelLayer(hosts=[f"tls://127.0.0.1:{port}"], ssl_context=context)
            try:
                await layer.send("tls-check", {"secret": b"\x00\x01"})
                return await asyncio.wait_for(layer.receive("tls-check"), START_TIMEOUT_S)
            finally:
                await layer.close()

        assert asyncio.run(round_trip()) == {"secret": b"\x00\x01"}
    assert f"listening on tls://127.0.0.1:{port}" in served.stderr


def test_token_is_required_when_the_daemon_has_one() -> None:
    """A wrong token gets PermissionError and is logged; the right one works."""
    import asyncio

    from broker.layer import BrokerChannelLayer

    port = free_port()
    token = {"CHANNELS_BROKER_TOKEN": "s3cret"}
    with serving(port, "--listen", f"127.0.0.1:{port}", env=token) as served:

        async def send_with(token: str) -> None:
            layer = BrokerChannelLayer(hosts=[f"tcp://127.0.0.1:{port}"], token=token)
            try:
                await layer.send("token-check", {"n": 1})
            finally:
                await layer.close()

        with pytest.raises(PermissionError, match="invalid token"):
            asyncio.run(send_with("wrong"))
        with pytest.raises(PermissionError, match="missing token"):
            asyncio.run(send_with(""))
        asyncio.run(send_with("s3cret"))
    assert "authentication failed" in served.stderr
    assert "no token (--token asks for one)" in served.stderr


def test_a_token_sent_to_a_daemon_without_one_is_served_and_said_once_per_client() -> None:
    """1. A daemon with no token.  2. One layer sends with a token from two event loops
    (two connections of one process), another layer once.  3. All are served; the log
    says twice, once per process, that their token is ignored."""
    import asyncio

    from broker.layer import BrokerChannelLayer

    port = free_port()
    with serving(port, "--listen", f"127.0.0.1:{port}") as served:
        first = BrokerChannelLayer(hosts=[f"tcp://127.0.0.1:{port}"], token="s3cret")
        second = BrokerChannelLayer(hosts=[f"tcp://127.0.0.1:{port}"], token="s3cret")

        async def send_with(layer: BrokerChannelLayer) -> None:
            await layer.send("token-check", {"n": 1})
            await layer.close()

        for layer in (first, first, second):
            asyncio.run(send_with(layer))
    lines = [line for line in served.stderr.splitlines() if "sent a token" in line]
    assert len(lines) == 2, served.stderr
    assert "this daemon has none" in lines[0] and "its token is ignored" in lines[0]


def test_unix_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    """A regular file where the socket should go: the daemon refuses, the file stays."""
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    code, stderr = _refused("--listen", f"127.0.0.1:{free_port()}", "--unix", str(path))
    assert code != 0
    assert "is not a socket" in stderr
    assert path.read_text() == "keep me"


def test_config_file_takes_a_single_listen_and_refuses_unknown_keys(tmp_path: Path) -> None:
    port = free_port()
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(f'[serve]\nlisten = "127.0.0.1:{port}"\n')
    bad.write_text('lisen = "127.0.0.1:1"\n')
    with serving(port, "--config", str(good)):
        pass
    code, stderr = _refused("--config", str(bad))
    assert code == 2
    assert "unknown keys lisen" in stderr


def test_listening_beyond_loopback_without_token_is_refused_at_start() -> None:
    """``--listen`` on an address other hosts reach, with no token, token file or client
    CA: exit 2 naming the flags that would allow it; nothing listens meanwhile."""
    port = free_port()
    for listen in (f"0.0.0.0:{port}", f"[::]:{port}", f"{outside_address()}:{port}"):
        code, stderr = _refused("--listen", "127.0.0.1:0", "--listen", listen)
        assert code == 2, stderr
        assert f"--listen {listen} is reachable from other hosts" in stderr
        for flag in ("--token", "--token-file", "--tls-client-ca", "--allow-unauthenticated"):
            assert flag in stderr
        assert "Traceback" not in stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.parametrize(
    ("args", "env", "warned"),
    [
        (("--allow-unauthenticated",), {}, True),
        ((), {"CHANNELS_BROKER_TOKEN": "s3cret"}, False),
    ],
    ids=["allow-unauthenticated", "token"],
)
def test_listening_beyond_loopback_starts_with_a_token_or_when_allowed_without(
    args: tuple[str, ...], env: dict[str, str], warned: bool
) -> None:
    """Allowed without a token, it says so at start; with a token it has nothing to say."""
    port = free_port()
    with serving(port, "--listen", f"0.0.0.0:{port}", *args, env=env) as served:
        pass
    assert ("serves any client that reaches it" in served.stderr) is warned
