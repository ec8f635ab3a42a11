"""What the CONFIG keys of channels_redis (core and pubsub) and channels_postgres mean here.

Theory of operation. A site moving over most often changes ``BACKEND`` and keeps its
``CONFIG``. The keys that mean the same here (``capacity``, ``expiry``, ``group_expiry``,
``channel_capacity``, ``prefix``, ``symmetric_encryption_keys``) are the layer's own
parameters and never reach this module. What reaches it belongs elsewhere now: the Redis
or PostgreSQL server is the daemon's (``channels-broker serve --backend URL``), so the
problem names that URL, built from what the site wrote (a password shown as ``****``),
and says to list the daemon in ``hosts``; a key with no meaning here says why it goes.
Each decision is in docs/migrating.md, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .problems import FOREIGN_KEY, POSTGRES_DATABASE, REDIS_ADDRESS, Problem

__all__ = [
    "FOREIGN_KEYS",
    "foreign_key_problems",
    "is_redis_address",
    "redis_address_problem",
    "redis_url_of",
]

#: What every hint shows as the daemon's address: ``channels-broker serve``'s default.
DAEMON_HOST = "tcp://127.0.0.1:7733"
#: Schemes of a Redis server, as channels_redis (redis-py) and the daemon's --backend write them.
_REDIS_SCHEMES = frozenset(
    {"redis", "rediss", "redis+unix", "redis+sentinel", "rediss+sentinel", "redis+cluster"}
)
#: channels_redis's keys for reaching Redis through Sentinel, when written beside ``hosts``.
_SENTINEL_KEYS = ("sentinels", "master_name", "sentinel_kwargs")
_REMOVE = "remove it"
#: channels_redis (core, pubsub) keys that mean nothing here: why, and what to do.
_REDIS_ONLY = {
    "random_prefix_length": "it set the length of channels_redis's message ids; this layer"
    " mints its own ids",
    "on_disconnect": "RedisPubSubChannelLayer called it when Redis dropped its connection;"
    " this layer reconnects to the daemon by itself, with backoff, and the daemon to Redis",
    "on_reconnect": "RedisPubSubChannelLayer called it when Redis came back; this layer"
    " reconnects to the daemon by itself, and messages that waited meanwhile arrive",
    "serializer_format": "this layer always packs messages with msgpack, channels_redis's"
    " default, and no other program reads them",
}
#: channels_postgres's CONFIG is a Django DATABASES entry: these keys say where PostgreSQL is.
_POSTGRES_KEYS = (
    "ENGINE",
    "NAME",
    "USER",
    "PASSWORD",
    "HOST",
    "PORT",
    "OPTIONS",
    "PSYCOPG_OPTIONS",
    "CONN_MAX_AGE",
    "CONN_HEALTH_CHECKS",
    "ATOMIC_REQUESTS",
    "AUTOCOMMIT",
    "TIME_ZONE",
    "TEST",
    "DISABLE_SERVER_SIDE_CURSORS",
)
#: Every key this module explains; any other unknown key is simply unknown.
FOREIGN_KEYS = frozenset({*_SENTINEL_KEYS, *_REDIS_ONLY, *_POSTGRES_KEYS})


def is_redis_address(entry: object) -> bool:
    """True for a ``hosts`` entry written for channels_redis: a (host, port) pair, a dict
    of connection arguments, or a Redis URL."""
    if isinstance(entry, tuple | list | Mapping):
        return True
    return isinstance(entry, str) and urlsplit(entry).scheme.lower() in _REDIS_SCHEMES


def redis_address_problem(key: str, entry: object) -> Problem:
    """The problem of ``hosts`` entry ``entry`` (at ``key``), a Redis address."""
    url = redis_url_of(entry)
    password = " (your password where **** is)" if "****" in url else ""
    return Problem(
        key,
        f"{key} is a Redis address, {_shown(entry)}, as channels_redis takes it",
        "this layer talks to a channels-broker daemon, and the daemon talks to Redis: start"
        f" it with `channels-broker serve --backend {url}`{password} and list the daemon"
        f' here instead, as "hosts": ["{DAEMON_HOST}"] (docs/migrating.md)',
        REDIS_ADDRESS,
    )


def redis_url_of(entry: object) -> str:
    """The daemon's ``--backend`` URL for a channels_redis ``hosts`` entry, without its
    password; placeholders in capitals where the entry does not say."""
    try:
        if isinstance(entry, str):
            return _without_password(entry)
        if isinstance(entry, tuple | list):
            host, port = entry
            return f"redis://{host}:{int(port)}"
        if isinstance(entry, Mapping):
            return _url_of_arguments(entry)
    except (TypeError, ValueError):
        pass  # an entry channels_redis would not have taken either: show the form
    return "redis://HOST:6379/0"


def _url_of_arguments(entry: Mapping[str, Any]) -> str:
    """channels_redis's dict entries: ``address`` (a URL), Sentinel, or redis-py's arguments."""
    if "address" in entry:
        address = str(entry["address"])
        # redis-py's unix:// is the daemon's own listener syntax; its Redis form is redis+unix://.
        redis_form = "redis+" + address if address.startswith("unix://") else address
        return _without_password(redis_form)
    db = f"/{int(entry['db'])}" if entry.get("db") is not None else ""
    auth = ":****@" if entry.get("password") else ""
    if "sentinels" in entry or "master_name" in entry:
        nodes = ",".join(f"{host}:{int(port)}" for host, port in entry.get("sentinels") or ())
        master = entry.get("master_name") or "MASTER"
        return f"redis+sentinel://{auth}{nodes or 'HOST:26379'}/{master}{db}"
    scheme = "rediss" if entry.get("ssl") else "redis"
    return f"{scheme}://{auth}{entry.get('host', 'localhost')}:{int(entry.get('port', 6379))}{db}"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:****@{host}").geturl()


def _shown(entry: object) -> str:
    """``entry`` for a message: a URL without its password, anything else as written."""
    if isinstance(entry, str):
        return repr(_without_password(entry))
    if isinstance(entry, Mapping):
        return "{" + ", ".join(f"{key!r}: ..." for key in entry) + "}"
    return repr(entry)


def foreign_key_problems(config: Mapping[str, Any]) -> list[Problem]:
    """The problems of channels_redis's and channels_postgres's keys in ``config``."""
    problems = [
        Problem(key, f"{key} is channels_redis's", f"{_REDIS_ONLY[key]}: {_REMOVE}", FOREIGN_KEY)
        for key in _REDIS_ONLY
        if key in config and not (key == "serializer_format" and config[key] == "msgpack")
    ]
    sentinel = [key for key in _SENTINEL_KEYS if key in config]
    if sentinel:
        written = {key: config[key] for key in sentinel}
        problems.append(redis_address_problem(sentinel[0], written))
    database = [key for key in _POSTGRES_KEYS if key in config]
    if database:
        problems.append(_postgres_problem(database, config))
    return problems


def _postgres_problem(keys: list[str], config: Mapping[str, Any]) -> Problem:
    auth = str(config.get("USER") or "postgres") + (":****" if config.get("PASSWORD") else "")
    where = f"{config.get('HOST') or 'localhost'}:{config.get('PORT') or 5432}"
    url = f"postgresql://{auth}@{where}/{config.get('NAME') or 'postgres'}"
    password = " (your password where **** is)" if config.get("PASSWORD") else ""
    return Problem(
        keys[0],
        f"{', '.join(keys)}: channels_postgres's database settings",
        "this layer talks to a channels-broker daemon, and the daemon talks to PostgreSQL:"
        f" start it with `channels-broker serve --backend {url}`{password}, remove these keys"
        f' and list the daemon here, as "hosts": ["{DAEMON_HOST}"] (docs/migrating.md)',
        POSTGRES_DATABASE,
    )
