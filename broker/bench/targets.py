"""The layers compared, and how each is built: a daemon per backend and event loop, running
daemons, and the references (channels_redis, channels-nats, and channels_postgres beside a
PostgreSQL backend)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import socket
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from .daemon_process import daemon
from .errors import describe
from .layers import CAPACITY, EXPIRY_S, LayerSpec, Note, Opened, Target
from .postgres_reference import channels_postgres_target
from .usage import pid_listening_on

__all__ = ["build_targets"]

POSTGRES_SCHEMES = ("postgresql", "postgres")
#: channels-nats 0.10.1 asks for Python 3.12 only for two annotations; this script
#: installs it on 3.11 (into the venv whose python it is given).
NATS_INSTALL_HINT = "deploy/bench/install-channels-nats.sh .venv/bin/python"


def broker_spec(address: str) -> LayerSpec:
    return LayerSpec(
        "broker.layer.channel_layer:BrokerChannelLayer",
        {"hosts": [address], "capacity": CAPACITY, "expiry": EXPIRY_S},
    )


def daemon_target(name: str, backend_url: str, loop: str) -> Target:
    is_memory = urlsplit(backend_url).scheme == "memory"

    @contextlib.contextmanager
    def open_target(note: Note) -> Iterator[Opened]:
        with daemon(backend_url, loop, note) as running:
            fresh = functools.partial(open_target, note) if is_memory else None
            yield Opened(broker_spec(running.address), running.pid, fresh)

    return Target(name, open_target, is_ours=True)


def running_target(address: str) -> Target:
    def open_target(note: Note) -> contextlib.AbstractContextManager[Opened]:
        return contextlib.nullcontext(Opened(broker_spec(address)))

    return Target(f"broker ({address})", open_target, is_ours=True)


def probe_redis(url: str) -> str:
    """The Redis server's version; raises if it does not answer PING."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
        client.ping()
        return str(client.info("server").get("redis_version", "?"))


def reference_target(name: str, spec: LayerSpec, server_port: int | None) -> Target:
    """A layer of another project, on a server that runs already (on ``server_port``)."""
    pid = pid_listening_on(server_port) if server_port else None
    opened = Opened(spec, server_pid=pid)
    return Target(name, lambda note: contextlib.nullcontext(opened), is_ours=False)


def channels_redis_target(redis_url: str, note: Note) -> Target | None:
    """channels_redis on ``redis_url``, or ``None`` with a note saying why not."""
    if importlib.util.find_spec("channels_redis") is None:
        note("channels_redis omitted: not installed (pip install 'channels-broker[bench]')")
        return None
    try:
        version = probe_redis(redis_url)
    except Exception as exc:  # any failure means the same: no column
        note(f"channels_redis omitted: Redis at {redis_url} did not answer PING ({describe(exc)})")
        return None
    note(f"channels_redis on {redis_url} (redis-server {version})")
    kwargs = {"hosts": [redis_url], "capacity": CAPACITY, "expiry": EXPIRY_S}
    spec = LayerSpec("channels_redis.core:RedisChannelLayer", kwargs)
    return reference_target("channels_redis", spec, urlsplit(redis_url).port or 6379)


def probe_nats(url: str) -> str:
    """The NATS server's version, from the INFO line it greets a client with."""
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 4222)
    with socket.create_connection(address, timeout=2) as sock:
        greeting = sock.makefile("rb").readline(4096).decode(errors="replace")
    if not greeting.startswith("INFO "):
        raise ConnectionError(f"not a NATS server: it said {greeting[:40]!r}")
    return str(json.loads(greeting[5:]).get("version", "?"))


def channels_nats_target(nats_url: str, note: Note) -> Target | None:
    """channels-nats on ``nats_url``, or ``None`` with a note saying why not."""
    if importlib.util.find_spec("channels_nats") is None:
        note(f"channels-nats omitted: not installed (on Python 3.11: {NATS_INSTALL_HINT})")
        return None
    try:
        version = probe_nats(nats_url)
    except Exception as exc:  # any failure means the same: no column
        note(f"channels-nats omitted: no NATS server answered at {nats_url} ({describe(exc)})")
        return None
    note(f"channels-nats on {nats_url} (nats-server {version})")
    kwargs = {"servers": [nats_url], "capacity": CAPACITY, "expiry": EXPIRY_S}
    spec = LayerSpec("channels_nats.layer:NatsChannelLayer", kwargs)
    return reference_target("channels-nats", spec, urlsplit(nats_url).port or 4222)


def daemon_names(urls: Sequence[str], loops: Sequence[str]) -> list[tuple[str, str, str]]:
    """(name, backend URL, loop) per daemon: "broker (memory)" reads best; the full URL
    only where two backends share a scheme, and the loop only when there are several."""
    schemes = [urlsplit(url).scheme for url in urls]
    return [
        (f"broker ({shown}{f', {loop}' if len(loops) > 1 else ''})", url, loop)
        for scheme, url in zip(schemes, urls, strict=True)
        for shown in [scheme if schemes.count(scheme) == 1 else url]
        for loop in loops
    ]


def build_targets(
    backends: Sequence[str],
    loops: Sequence[str],
    addresses: Sequence[str],
    peers: dict[str, str],
    note: Note,
) -> list[Target]:
    """Ours first (a daemon per backend and loop, then running daemons), then the
    references; ``peers`` has the ``redis`` and ``nats`` URLs of theirs."""
    targets = [daemon_target(*named) for named in daemon_names(backends, loops)]
    targets += [running_target(address) for address in addresses]
    references = [
        channels_redis_target(peers["redis"], note),
        channels_nats_target(peers["nats"], note),
    ]
    targets += [reference for reference in references if reference is not None]
    postgres = [url for url in backends if urlsplit(url).scheme in POSTGRES_SCHEMES]
    # The same database for channels_postgres, in a schema of its own.
    pg_reference = channels_postgres_target(postgres[0], note) if postgres else None
    targets += [] if pg_reference is None else [pg_reference]
    return targets
