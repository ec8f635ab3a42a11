"""Tenants: each token of ``--token-file`` may use one namespace, against real daemons.

The attack of issue 14: with one token per daemon and the prefix chosen in HELLO, any
token holder could read, join, discard and flush another site's channels and groups by
naming its prefix. Now a token bound to a namespace is refused at HELLO (FORBIDDEN) for
any other, and nothing it does in its own namespace reaches another.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from protocol import PROTOCOL_VERSION, Error, ErrorCode, Hello, encode_frame
from tests.broker.raw_client import RawClient
from tests.broker.samples import scrape, value
from tests.conftest import BrokerProcess, LayerFactory
from tests.waits import assert_nothing_within, receive

#: One token per site, and the operator's for any namespace.
A, B, C, OPS = (secrets.token_hex(16) for _ in range(4))


def write_tokens(path: Path, *lines: str) -> Path:
    path.write_text("# written by the test\n" + "".join(f"{line}\n" for line in lines))
    return path


@pytest.fixture
def tenants(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> tuple[BrokerProcess, Path]:
    """A daemon for sites A and B (and the operator), and its token file."""
    path = write_tokens(tmp_path / "tokens", f"{A} site-a", f"{B} site-b", f"{OPS} *")
    return broker_factory(extra_args=("--token-file", str(path))), path


@asynccontextmanager
async def layers(daemon: BrokerProcess) -> AsyncIterator[LayerFactory]:
    factory = LayerFactory(daemon)
    try:
        yield factory
    finally:
        await factory.aclose()


async def refused_hello(daemon: BrokerProcess, token: str, prefix: str) -> ErrorCode | None:
    """The connection-level error a raw HELLO gets (None if it got anything else)."""
    raw = await RawClient.open(daemon.address)
    try:
        hello = Hello(PROTOCOL_VERSION, token, "", prefix, 100, 60.0, 86400.0)
        await raw.write(encode_frame(hello))
        frames = await raw.frames_until_closed()
    finally:
        raw.close()
    if len(frames) == 1 and isinstance(frames[0], Error) and frames[0].request_id == 0:
        return frames[0].error_code
    return None


async def test_a_token_bound_to_a_namespace_reaches_nothing_outside_it(
    tenants: tuple[BrokerProcess, Path], unique: Callable[[str], str]
) -> None:
    """1. Site B has messages waiting: on a worker channel, on a consumer's channel, and
       through a group.
    2. A's token naming B's prefix is refused at HELLO (FORBIDDEN): send, receive,
       group_add, group_discard, group_send and flush each raise PermissionError.
    3. A, in its own namespace, flushes and uses B's channel and group names: no effect on B.
    4. B gets everything; the operator's token may use either prefix.
    """
    daemon, _ = tenants
    async with layers(daemon) as make:
        site_b = make(token=B, prefix="site-b")
        consumer = make(token=B, prefix="site-b")
        work, group = unique("work"), unique("room")
        member = await consumer.new_channel()
        await consumer.group_add(group, member)
        await site_b.send(work, {"n": 1})
        await site_b.send(member, {"n": 2})
        await site_b.group_send(group, {"n": 3})

        calls: list[Callable[[Any], Awaitable[Any]]] = [
            lambda layer: layer.send(work, {"n": "forged"}),
            lambda layer: layer.receive(work),
            lambda layer: layer.group_add(group, unique("spy")),
            lambda layer: layer.group_discard(group, member),
            lambda layer: layer.group_send(group, {"n": "forged"}),
            lambda layer: layer.flush(),
        ]
        for call in calls:
            with pytest.raises(PermissionError, match="may not use namespace 'site-b'"):
                await call(make(token=A, prefix="site-b"))
        assert await refused_hello(daemon, A, "site-b") is ErrorCode.FORBIDDEN

        site_a = make(token=A, prefix="site-a")
        await site_a.flush()
        await site_a.group_discard(group, member)
        await site_a.group_send(group, {"n": "from a"})
        await assert_nothing_within(site_a, work)

        assert await receive(site_b, work) == {"n": 1}
        assert [(await receive(consumer, member))["n"] for _ in range(2)] == [2, 3]
        await assert_nothing_within(consumer, member)
        for prefix in ("site-a", "site-b"):
            operator = make(token=OPS, prefix=prefix)
            await operator.send(work, {"n": prefix})
            assert await receive(operator, work) == {"n": prefix}


async def test_wrong_tokens_are_counted_and_logged_without_any_token(
    tenants: tuple[BrokerProcess, Path],
) -> None:
    """A guessed token: AUTH_FAILED, one auth failure in the metrics; a namespace refused:
    one FORBIDDEN; no log line holds a token, the guessed one included."""
    daemon, _ = tenants
    guess = secrets.token_hex(16)
    assert await refused_hello(daemon, guess, "site-a") is ErrorCode.AUTH_FAILED
    assert await refused_hello(daemon, A, "site-b") is ErrorCode.FORBIDDEN
    daemon.wait_for_log(lambda line: "authentication failed" in line)
    daemon.wait_for_log(lambda line: "may not use namespace 'site-b'" in line)
    samples = await asyncio.to_thread(scrape, daemon)
    assert value(samples, "channels_broker_auth_failures_total") == 1
    assert value(samples, "channels_broker_protocol_errors_total", code="forbidden") == 1
    log = daemon.stderr_text()
    assert not [token for token in (A, B, OPS, guess) if token in log]


@pytest.mark.backends("memory")  # the file and the signal are the same on every backend
async def test_sighup_rereads_the_file_and_drops_no_connection(
    tenants: tuple[BrokerProcess, Path], unique: Callable[[str], str]
) -> None:
    """1. B is connected. 2. The file loses B and gains C; SIGHUP.
    3. B's connection still works; a new HELLO with B is refused; C is admitted.
    4. A broken file and SIGHUP: logged, and the tokens stay as they were.
    """
    daemon, path = tenants
    assert daemon.process is not None
    async with layers(daemon) as make:
        site_b = make(token=B, prefix="site-b")
        channel = await site_b.new_channel()
        await site_b.send(channel, {"n": 1})
        assert await receive(site_b, channel) == {"n": 1}
        connection = site_b._client().conn

        write_tokens(path, f"{A} site-a", f"{C} site-c")
        os.kill(daemon.process.pid, signal.SIGHUP)
        daemon.wait_for_log(lambda line: "SIGHUP: 2 tokens" in line)
        await site_b.send(channel, {"n": 2})
        assert await receive(site_b, channel) == {"n": 2}
        assert site_b._client().conn is connection
        assert await refused_hello(daemon, B, "site-b") is ErrorCode.AUTH_FAILED
        site_c = make(token=C, prefix="site-c")
        await site_c.send(channel, {"n": 3})

        path.write_text(f"{C}\n")  # no namespace: not a valid file
        os.kill(daemon.process.pid, signal.SIGHUP)
        daemon.wait_for_log(lambda line: "keeping the tokens as they were" in line)
        assert await refused_hello(daemon, B, "site-b") is ErrorCode.AUTH_FAILED
        await make(token=C, prefix="site-c").send(unique("work"), {"n": 4})
        assert daemon.is_running()
