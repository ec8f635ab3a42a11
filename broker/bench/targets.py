"""The layers compared, and how each is built: a daemon per backend, running daemons, and
the references (channels_redis, and channels_postgres beside a PostgreSQL backend)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from .daemon_process import daemon
from .errors import describe
from .layers import CAPACITY, EXPIRY_S, ChannelLayer, LayerFactory, Note, Target
from .postgres_reference import channels_postgres_target

__all__ = ["build_targets"]

POSTGRES_SCHEMES = ("postgresql", "postgres")


def broker_factory(address: str) -> LayerFactory:
    from broker.layer.channel_layer import BrokerChannelLayer

    return functools.partial(
        BrokerChannelLayer, hosts=[address], capacity=CAPACITY, expiry=EXPIRY_S
    )


def daemon_target(name: str, backend_url: str) -> Target:
    @contextlib.contextmanager
    def open_target(note: Note) -> Iterator[LayerFactory]:
        with daemon(backend_url, note) as address:
            yield broker_factory(address)

    return Target(name, open_target, is_ours=True)


def running_target(address: str) -> Target:
    def open_target(note: Note) -> contextlib.AbstractContextManager[LayerFactory]:
        return contextlib.nullcontext(broker_factory(address))

    return Target(f"broker ({address})", open_target, is_ours=True)


def probe_redis(url: str) -> str:
    """The Redis server's version; raises if it does not answer PING."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
        client.ping()
        return str(client.info("server").get("redis_version", "?"))


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

    def factory() -> ChannelLayer:
        from channels_redis.core import RedisChannelLayer

        layer: ChannelLayer = RedisChannelLayer(
            hosts=[redis_url], capacity=CAPACITY, expiry=EXPIRY_S
        )
        return layer

    return Target("channels_redis", lambda note: contextlib.nullcontext(factory), is_ours=False)


def backend_names(urls: Sequence[str]) -> list[str]:
    # "broker (memory)" reads best; the full URL only where two backends share a scheme.
    schemes = [urlsplit(url).scheme for url in urls]
    return [
        f"broker ({scheme if schemes.count(scheme) == 1 else url})"
        for scheme, url in zip(schemes, urls, strict=True)
    ]


def build_targets(
    backends: Sequence[str], addresses: Sequence[str], redis_url: str, note: Note
) -> list[Target]:
    """Ours first (a daemon per backend, then running daemons), then the references."""
    targets = [
        daemon_target(n, url) for n, url in zip(backend_names(backends), backends, strict=True)
    ]
    targets += [running_target(address) for address in addresses]
    reference = channels_redis_target(redis_url, note)
    targets += [] if reference is None else [reference]
    postgres = [url for url in backends if urlsplit(url).scheme in POSTGRES_SCHEMES]
    # The same database for channels_postgres, in a schema of its own.
    pg_reference = channels_postgres_target(postgres[0], note) if postgres else None
    targets += [] if pg_reference is None else [pg_reference]
    return targets
