"""Throwaway storage servers for the tests: redis-server processes and a Redis Cluster.

``backend_url(param)`` turns a backend parameter of ``tests/conftest.py`` into a URL the
tests can use, starting what it needs once per test session:

* ``redis://`` -> the Redis at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) if
  it answers, else a redis-server of our own on a free port; each session gets its own
  key prefix, so runs never see each other's keys and nothing is ever FLUSHALLed;
  a test that needs a server-wide command (SCRIPT FLUSH, CONFIG SET...) takes
  ``own_url(url)``, a server of our own, and runs it through ``server_command``, which
  refuses any server this session did not start (tests/test_hygiene.py holds every test
  to that);
* ``redis+cluster://`` -> a three-node Redis Cluster of our own, on free ports;
* ``redis+sentinel://`` -> a redis-server and a Sentinel of our own that names it.

If a server can be neither reached nor started the session fails, with a message that
says what to install; outside CI, ``CHANNELS_BROKER_SKIP_REDIS=1`` turns that into a
skip (under ``CI=true`` a backend that cannot be tested is always a failure).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import pg_server
from tests.ports import free_port, free_ports, is_free
from tests.waits import POLL_S, START_TIMEOUT_S

__all__ = [
    "REDIS_PARAMS",
    "RedisCluster",
    "RedisServer",
    "backend_url",
    "free_ports",  # from tests.ports; the backend tests take it from here
    "note_own",
    "own_url",
    "redis_available",
    "server_command",
    "session_prefix",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: Backend parameters for ``BACKEND_URLS``: resolved (and started) by ``backend_url``.
REDIS_PARAMS = ["redis://", "redis+cluster://"]
#: One key prefix per test session: tests of parallel sessions share the Redis at 6379.
session_prefix = f"cbtest-{uuid.uuid4().hex[:10]}"

_started: dict[str, str] = {}
#: Ports of every redis-server (and Sentinel) this session started: the only servers
#: ``server_command`` may send a server-wide command.
_own_ports: set[int] = set()
_servers: list[RedisServer | RedisCluster | RedisSentinel] = []
_shared: list[str] = []


def cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free too: at most 55535."""
    while True:
        port = free_port()
        if port <= 55535 and is_free(port + 10000):
            return port
        for _ in range(100):  # ephemeral ports are often high: try lower ones
            candidate = 20000 + int.from_bytes(os.urandom(2), "big") % 30000
            if is_free(candidate) and is_free(candidate + 10000):
                return candidate


def ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True if a Redis answers PING at host:port (plain RESP over a socket, no driver)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One redis-server on a free port in a temp dir; killable and restartable in place.

    ``appendonly`` makes it durable across a kill (fsync on every write), for tests
    that restart Redis and expect accepted messages back.
    """

    def __init__(
        self, *, appendonly: bool = False, extra: tuple[str, ...] = (), port: int | None = None
    ) -> None:
        self.port = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cb-redis-"))
        self.appendonly = appendonly
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.dir), "--save", "", "--daemonize", "no"]
        args += ["--logfile", str(self.dir / "redis.log")]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        return args + list(self.extra)

    def start(self) -> None:
        _own_ports.add(self.port)
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ping("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start: {self.log()}")
            time.sleep(POLL_S)

    def kill(self) -> None:
        """SIGKILL: the crash a restart test needs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"


class RedisCluster:
    """Three primaries (no replicas) with ``--cluster-enabled yes``, joined by redis-cli."""

    def __init__(self, nodes: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas  # per primary
        self.servers = [
            RedisServer(
                extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                port=cluster_port(),
            )
            for _ in range(nodes)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{server.port}" for server in self.servers)
        return f"redis+cluster://{hosts}"

    def start(self) -> None:
        for server in self.servers:
            server.start()
        addresses = [f"127.0.0.1:{server.port}" for server in self.servers]
        subprocess.run(
            [_redis_cli(), "--cluster", "create", *addresses]
            + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        self._wait_ok()

    def _wait_ok(self) -> None:
        """Until every node says the cluster is ok: each decides on its own, from gossip,
        and one still saying CLUSTERDOWN fails the commands routed to it."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for server in self.servers:
            while True:
                info = subprocess.run(
                    [_redis_cli(), "-p", str(server.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                if "cluster_state:ok" in info:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Redis Cluster node {server.port} not ok after {START_TIMEOUT_S} s: {info}"
                    )
                time.sleep(0.1)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class RedisSentinel:
    """A master and one Sentinel (``redis-server --sentinel``) that names it ``mymaster``."""

    MASTER_NAME = "mymaster"

    def __init__(self) -> None:
        self.master = RedisServer()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cb-sentinel-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.MASTER_NAME}"

    def start(self) -> None:
        self.master.start()
        config = self.dir / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.master.port} 1\n"
        )
        _own_ports.add(self.port)
        self.process = subprocess.Popen(
            [_redis_server(), str(config), "--sentinel", "--logfile", str(self.dir / "log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ping("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis sentinel on port {self.port} did not start")
            time.sleep(POLL_S)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.master.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _redis_server() -> str:
    return shutil.which("redis-server") or "redis-server"


def _redis_cli() -> str:
    return shutil.which("redis-cli") or "redis-cli"


def redis_available() -> bool:
    """True if a redis-server binary is installed (for tests that start their own)."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _unavailable(what: str, why: str) -> None:
    message = (
        f"{what} cannot be tested: {why}. Install redis-server and redis-cli"
        " (apt-get install redis-server), or point REDIS_URL at a Redis."
    )
    if os.environ.get("CI", "").lower() != "true" and os.environ.get("CHANNELS_BROKER_SKIP_REDIS"):
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def _shared_redis() -> str:
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    parts = urlsplit(url)
    if parts.scheme == "redis" and ping(parts.hostname or "127.0.0.1", parts.port or 6379):
        _shared.append(url)
        return url
    if not redis_available():
        _unavailable("the Redis backend", f"nothing answers at {url} and redis-server is missing")
    server = RedisServer()
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        _unavailable(
            "the Redis backend", f"nothing answers at {url}, and starting one failed: {exc}"
        )
    _servers.append(server)
    return server.url


def _cluster() -> str:
    if not redis_available():
        _unavailable("Redis Cluster", "redis-server or redis-cli is missing")
    cluster = RedisCluster()
    _servers.append(cluster)
    try:
        cluster.start()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _unavailable("Redis Cluster", f"starting a three-node cluster failed: {exc}")
    return cluster.url


def _sentinel() -> str:
    if not redis_available():
        _unavailable("Redis Sentinel", "redis-server is missing")
    sentinel = RedisSentinel()
    _servers.append(sentinel)
    try:
        sentinel.start()
    except (OSError, RuntimeError) as exc:
        _unavailable("Redis Sentinel", f"starting a master and a sentinel failed: {exc}")
    return sentinel.url


def _with_prefix(url: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}prefix={session_prefix}"


def backend_url(param: str) -> str:
    """The URL to test for backend parameter ``param`` (started on first use)."""
    if param not in _started:
        scheme = urlsplit(param).scheme
        if scheme == "redis" and param == "redis://":
            _started[param] = _with_prefix(_shared_redis())
        elif scheme == "redis+cluster" and param == "redis+cluster://":
            _started[param] = _with_prefix(_cluster())
        elif scheme == "redis+sentinel" and param == "redis+sentinel://":
            _started[param] = _with_prefix(_sentinel())
        elif param in pg_server.POSTGRES_PARAMS:
            _started[param] = pg_server.backend_url(param)
        else:
            _started[param] = param
    return _started[param]


def _nodes(url: str) -> list[tuple[str, int]]:
    """The host:port pairs a Redis URL names (a Cluster's list, or the one server)."""
    hosts = urlsplit(url).netloc.rpartition("@")[2]
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        nodes.append((host or item, int(port) if port.isdigit() else 6379))
    return nodes


def note_own(port: int) -> None:
    """Count a server this session started outside this module (a Sentinel of a failover
    test) as its own, where ``server_command`` may run."""
    _own_ports.add(port)


def _is_own(url: str) -> bool:
    return all(
        host in ("127.0.0.1", "localhost") and port in _own_ports for host, port in _nodes(url)
    )


def own_url(url: str) -> str:
    """``url`` if this session started its servers (a Cluster always), else the URL of a
    redis-server of our own (started once), with the session's key prefix: where a test
    may run a server-wide command."""
    if _is_own(url):
        return url
    if "own" not in _started:
        if not redis_available():
            _unavailable("a throwaway Redis", "redis-server is missing")
        server = RedisServer()
        _servers.append(server)
        server.start()
        _started["own"] = _with_prefix(server.url)
    return _started["own"]


def server_command(url: str, *command: str) -> None:
    """Run a server-wide command (``SCRIPT FLUSH``, ``CONFIG SET``...) on every server of
    ``url``, which this session must have started: the Redis at ``REDIS_URL`` serves other
    applications and other test runs, whose scripts and settings these commands change."""
    if not _is_own(url):
        raise AssertionError(f"{' '.join(command[:2])} refused: {url} is not a server of ours")
    import redis

    for host, port in _nodes(url):
        with redis.Redis(host=host, port=port, socket_timeout=5) as client:
            client.execute_command(*command)


def delete_prefixed(url: str, prefix: str) -> None:
    """Delete the keys under ``prefix`` (SCAN, never KEYS or FLUSHALL)."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=5) as client:
        batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(batch), 500):
            client.unlink(*batch[start : start + 500])


@atexit.register
def _stop_servers() -> None:
    for url in _shared:
        with contextlib.suppress(Exception):  # a best-effort tidy-up; keys expire anyway
            delete_prefixed(url, session_prefix)
    for server in _servers:
        server.stop()
    _servers.clear()
