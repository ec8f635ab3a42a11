"""What the Redis backend adds to the storage contract: URLs, key layout, wake-ups
across daemons, and behaviour when Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from backends import Backend, BackendError, BackendUnavailable, backend_from_url
from backends.redis import RedisBackend
from backends.redis.keys import Keys
from backends.redis.url import RedisSettings
from tests import servers
from tests.backends.test_backend_contract import LONG_S, WakeupLog, drain, put


@pytest.fixture(params=["redis://", "redis+cluster://"], ids=["redis", "redis+cluster"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """This module's backends: the session's Redis and the throwaway Cluster."""
    return servers.backend_url(request.param)


@pytest.fixture
def other(backend_url: str) -> Backend:
    """A second backend on the same Redis: another daemon."""
    return backend_from_url(backend_url)


# URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", {"mode": "standalone", "hosts": (("localhost", 6379),), "db": 0}),
        ("redis://:pw@h:7000/3", {"hosts": (("h", 7000),), "db": 3, "password": "pw"}),
        ("redis://u:p%40ss@h/0?prefix=site1", {"username": "u", "password": "p@ss"}),
        ("rediss://h:6380?ssl_cert_reqs=none", {"tls": True, "ssl": {"ssl_cert_reqs": "none"}}),
        ("redis+unix:///run/redis.sock?db=2", {"mode": "unix", "path": "/run/redis.sock", "db": 2}),
        (
            "redis+sentinel://s1:26379,s2/mymaster/1?sentinel_password=x",
            {
                "mode": "sentinel",
                "hosts": (("s1", 26379), ("s2", 26379)),
                "master_name": "mymaster",
                "db": 1,
                "sentinel_password": "x",
            },
        ),
        ("redis+cluster://a:7000,b:7001", {"mode": "cluster", "hosts": (("a", 7000), ("b", 7001))}),
        ("redis://h?timeout=0.5&connect_timeout=1", {"timeout_s": 0.5, "connect_timeout_s": 1.0}),
    ],
)
def test_url_forms_are_parsed(url: str, expected: dict[str, object]) -> None:
    settings = RedisSettings.from_url(url)
    for name, value in expected.items():
        assert getattr(settings, name) == value, name


@pytest.mark.parametrize(
    "url",
    [
        "redis://",
        "redis://a:1,b:2",
        "redis://h?prefix=has{brace}",
        "redis://h?unknown=1",
        "redis://h?timeout=0",
        "redis+unix://host/path",
        "redis+sentinel://s1:26379",
        "redis+cluster://a:7000/2",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(BackendError):
        backend_from_url(url)


def test_errors_never_show_the_password() -> None:
    with pytest.raises(BackendError) as info:
        RedisSettings.from_url("redis://user:secret@h?bogus=1")
    assert "secret" not in str(info.value)


# Key layout


def test_one_clients_channels_share_a_slot_and_groups_have_their_own() -> None:
    keys = Keys("p")
    client = [
        *keys.channel_keys("asgi", "specific.c0ffee00!a"),
        *keys.channel_keys("asgi", "other.c0ffee00!b"),
        keys.index("asgi", "c0ffee00"),
        keys.client_wake("asgi", "c0ffee00"),
    ]
    assert len({Keys.slot(key) for key in client}) == 1
    normal = [*keys.channel_keys("asgi", "work"), keys.wake("asgi", "work")]
    assert len({Keys.slot(key) for key in normal}) == 1
    assert keys.group("asgi", "room").startswith("p:{asgi#room}")


# Wake-ups across daemons


async def test_a_send_through_one_daemon_wakes_the_other(
    backend: Backend, other: Backend, ns: str
) -> None:
    log, own_log = WakeupLog(), WakeupLog()
    other.set_wakeup(log)
    backend.set_wakeup(own_log)
    other.watch(ns, "c0ffee00")
    other.watch(ns, "work")
    await asyncio.sleep(0.2)  # let the subscriptions become active
    await put(backend, ns, "specific.c0ffee00!x", b"1")
    await put(backend, ns, "work", b"2")
    await log.wait_for({(ns, "specific.c0ffee00!x"), (ns, "work")})
    assert (ns, "work") in own_log.calls, "the sender's own router is woken at once"


async def test_messages_sent_before_a_watch_are_found(
    backend: Backend, other: Backend, ns: str
) -> None:
    await put(backend, ns, "specific.c0ffee00!x", b"1")
    await put(backend, ns, "work", b"2")
    log = WakeupLog()
    other.set_wakeup(log)
    other.watch(ns, "c0ffee00")
    other.watch(ns, "work")
    await log.wait_for({(ns, "specific.c0ffee00!x"), (ns, "work")})


async def test_take_skips_expired_heads_and_fills_its_limit(backend: Backend, ns: str) -> None:
    await put(backend, ns, "work", b"old", expiry_s=0.05)
    await put(backend, ns, "work", b"old2", expiry_s=0.05)
    await put(backend, ns, "work", b"new")
    await asyncio.sleep(0.12)
    taken = await backend.take(ns, "work", 1, hold=False)
    assert [t.payload for t in taken] == [b"new"]


@pytest.fixture
def own_url(backend_url: str) -> str:
    """``backend_url``'s kind of Redis, on servers of our own: SCRIPT FLUSH empties the
    script cache of every application on a server, so never the shared one."""
    return servers.own_url(backend_url)


@pytest.fixture
def own_backend(own_url: str) -> Backend:
    return backend_from_url(own_url)


async def test_scripts_come_back_after_a_script_flush(
    own_backend: Backend, own_url: str, ns: str
) -> None:
    assert isinstance(own_backend, RedisBackend)
    await put(own_backend, ns, "work", b"1")
    servers.server_command(own_url, "SCRIPT", "FLUSH")
    await put(own_backend, ns, "work", b"2")
    assert await drain(own_backend, ns, "work") == [b"1", b"2"]


# Faults (a throwaway server: killed and restarted)


@pytest.fixture
def doomed() -> Iterator[servers.RedisServer]:
    if not servers.redis_available():
        pytest.fail("redis-server is needed for the fault tests", pytrace=False)
    server = servers.RedisServer(appendonly=True)
    server.start()
    yield server
    server.stop()


async def test_unreachable_redis_fails_fast_and_recovers(doomed: servers.RedisServer) -> None:
    """1. Redis dies: operations raise BackendUnavailable at once, /readyz is false.
    2. Redis comes back: the backend reconnects by itself, data is still there, and
       every watched key is woken again (nothing waits forever after the outage).
    """
    backend = backend_from_url(f"{doomed.url}?timeout=1&prefix=fault")
    await backend.connect()
    try:
        log = WakeupLog()
        backend.set_wakeup(log)
        backend.watch("ns", "work")
        assert await backend.send("ns", "work", b"kept", capacity=10, expiry_s=LONG_S)
        doomed.kill()
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await backend.send("ns", "work", b"x", capacity=10, expiry_s=LONG_S)
        assert time.monotonic() - started < 1.5
        assert not await backend.is_ready()
        log.calls.clear()
        await asyncio.to_thread(doomed.start)
        async with asyncio.timeout(5):
            while not await backend.is_ready():
                await asyncio.sleep(0.05)
        await log.wait_for({("ns", "work")})
        assert [t.payload for t in await backend.take("ns", "work", 10, hold=False)] == [b"kept"]
    finally:
        await backend.close()


async def test_connect_to_nothing_raises_backend_unavailable() -> None:
    port = servers.free_ports(1)[0]
    backend = backend_from_url(f"redis://127.0.0.1:{port}?connect_timeout=0.5&timeout=0.5")
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await backend.connect()
    assert time.monotonic() - started < 2.0
    assert not await backend.is_ready()


async def test_stats_count_waiting_messages_and_memberships(backend: Backend, ns: str) -> None:
    from backends.redis.stats import read_stats

    assert isinstance(backend, RedisBackend)
    await put(backend, ns, "work", b"1")
    await put(backend, ns, "work", b"2")
    await backend.group_add(ns, "room", "a", group_expiry_s=LONG_S)
    await backend.group_add(ns, "room", "b", group_expiry_s=LONG_S)
    stats = await read_stats(backend._commands.require().pipes(), backend.settings.prefix)
    assert stats.channels_waiting >= 1
    assert stats.messages_waiting >= 2
    assert stats.groups >= 1
    assert stats.memberships >= 2


async def test_top_channels_lists_the_longest_queues(backend: Backend, ns: str) -> None:
    """What ``channels-broker status`` shows, for this test's namespace."""
    assert isinstance(backend, RedisBackend)
    for channel, count in (("work", 3), ("specific.c1!x", 2), ("other", 1)):
        for index in range(count):
            await put(backend, ns, channel, str(index).encode())
    top = [row for row in await backend.top_channels(1000) or [] if row[0] == ns]
    assert top == [(ns, "work", 3), (ns, "specific.c1!x", 2), (ns, "other", 1)]
    assert len(await backend.top_channels(2) or []) <= 2


async def test_take_many_takes_from_every_channel_at_once(backend: Backend, ns: str) -> None:
    channels = ["specific.c0ffee00!a", "specific.c0ffee00!b", "work"]
    for channel in channels:
        await put(backend, ns, channel, channel.encode() + b"1", cap=2)
        await put(backend, ns, channel, channel.encode() + b"2", cap=2)
    taken = await backend.take_many(ns, [*channels, "empty"], 10, hold=True)
    assert {c: [t.payload for t in items] for c, items in taken.items()} == {
        **{c: [c.encode() + b"1", c.encode() + b"2"] for c in channels},
        "empty": [],
    }
    assert not await put(backend, ns, "work", b"3", cap=2), "held, so still counted"


# A send to a client attached to the sending daemon (see backends/redis/stash.py)


async def test_a_local_owners_message_is_grabbed_and_still_counted(
    backend: Backend, ns: str
) -> None:
    """1. With the owner attached here, sends hand messages straight back (no take round trip).
    2. They count against capacity until released, come out in order, and are listed
       by channels_with_messages.
    """
    backend.watch(ns, "c0ffee00")
    channel = "specific.c0ffee00!x"
    assert await put(backend, ns, channel, b"1", cap=2)
    assert await put(backend, ns, channel, b"2", cap=2)
    assert not await put(backend, ns, channel, b"3", cap=2), "grabbed messages count"
    assert await backend.channels_with_messages(ns, "c0ffee00") == [channel]
    taken = await backend.take(ns, channel, 10, hold=True)
    assert [t.payload for t in taken] == [b"1", b"2"]
    assert all(50 < t.ttl_s <= LONG_S for t in taken)
    assert not await put(backend, ns, channel, b"3", cap=2), "held until released"
    await backend.release(ns, channel, 2)
    assert await put(backend, ns, channel, b"3", cap=2)
    assert [t.payload for t in await backend.take(ns, channel, 10, hold=False)] == [b"3"]
    assert await put(backend, ns, channel, b"4", cap=1), "a pull released what it took"
    backend.unwatch(ns, "c0ffee00")


async def test_grabbed_messages_go_back_when_the_owner_leaves(
    backend: Backend, other: Backend, ns: str
) -> None:
    """A grabbed message not taken before its owner detaches is queued again, first."""
    backend.watch(ns, "c0ffee00")
    channel = "specific.c0ffee00!x"
    await put(backend, ns, channel, b"1")
    await put(other, ns, channel, b"2")  # another daemon: it waits in Redis
    backend.unwatch(ns, "c0ffee00")
    async with asyncio.timeout(5):
        while not await other.channels_with_messages(ns, "c0ffee00"):
            await asyncio.sleep(0.02)
    assert await drain(other, ns, channel) == [b"1", b"2"]


async def test_a_message_nobody_takes_goes_back_to_redis(
    backend: Backend, other: Backend, ns: str
) -> None:
    backend.watch(ns, "c0ffee00")
    await put(backend, ns, "specific.c0ffee00!x", b"1")
    async with asyncio.timeout(5):
        while not await other.channels_with_messages(ns, "c0ffee00"):
            await asyncio.sleep(0.05)
    assert await drain(other, ns, "specific.c0ffee00!x") == [b"1"]
    backend.unwatch(ns, "c0ffee00")


async def test_closing_puts_grabbed_messages_back(
    backend_url: str, other: Backend, ns: str
) -> None:
    leaving = backend_from_url(backend_url)
    await leaving.connect()
    leaving.watch(ns, "c0ffee00")
    await put(leaving, ns, "specific.c0ffee00!x", b"1")
    await leaving.close()
    assert await drain(other, ns, "specific.c0ffee00!x") == [b"1"]


async def test_a_unix_socket_url_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not servers.redis_available():
        pytest.fail("redis-server is needed for the Unix socket test", pytrace=False)
    path = tmp_path_factory.mktemp("redis") / "redis.sock"
    server = servers.RedisServer(extra=("--unixsocket", str(path), "--unixsocketperm", "700"))
    server.start()
    backend = backend_from_url(f"redis+unix://{path}?db=1&prefix=unix")
    try:
        await backend.connect()
        assert await put(backend, "ns", "work", b"over the socket")
        assert await drain(backend, "ns", "work") == [b"over the socket"]
    finally:
        await backend.close()
        server.stop()


async def test_a_tls_url_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    """rediss:// against a TLS port, verifying the server's self-signed certificate."""
    if not servers.redis_available() or shutil.which("openssl") is None:
        pytest.fail("redis-server and openssl are needed for the TLS test", pytrace=False)
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"],
        check=True,
        capture_output=True,
    )
    tls_port = servers.free_ports(1)[0]
    server = servers.RedisServer(
        extra=("--tls-port", str(tls_port), "--tls-cert-file", str(cert))
        + ("--tls-key-file", str(key), "--tls-ca-cert-file", str(cert))
        + ("--tls-auth-clients", "no")
    )
    server.start()
    backend = backend_from_url(f"rediss://localhost:{tls_port}/0?ssl_ca_certs={cert}&prefix=tls")
    try:
        await backend.connect()
        assert await put(backend, "ns", "work", b"encrypted")
        assert await drain(backend, "ns", "work") == [b"encrypted"]
    finally:
        await backend.close()
        server.stop()
