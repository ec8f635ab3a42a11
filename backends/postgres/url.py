"""The PostgreSQL backend's URL: where to connect, and the options it takes from the query.

``postgresql://user:password@host:5432/db?schema=channels_broker&unlogged=false&
migrate=true&pool_size=10&recheck_interval=1.0&timeout=5.0&prefetch=32&lease=5&room_lapse=10``
(``postgres://`` too). Every other query parameter goes to asyncpg: its connection
parameters (``sslmode``...) and PostgreSQL session settings (``synchronous_commit=off``...).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from backends import BackendError, redacted_url

__all__ = ["DEFAULT_SCHEMA", "PostgresOptions"]

DEFAULT_SCHEMA = "channels_broker"
#: Connections per daemon: enough for many client connections' requests in flight;
#: PostgreSQL's own default limit (100) leaves room for several daemons.
DEFAULT_POOL_SIZE = 10
#: The longest any operation waits (for a connection and its answer) before failing
#: with ``BackendUnavailable``: a client gets BACKEND_UNAVAILABLE instead of hanging.
DEFAULT_TIMEOUT_S = 5.0
#: Up to this many messages of a normal channel that workers pull busily are taken
#: out ahead of their pulls (under a lease: a daemon killed outright loses none).
DEFAULT_PREFETCH = 32
MAX_PREFETCH = 1000
#: The most a missed notification delays a message.
DEFAULT_RECHECK_S = 1.0
#: How long a message taken for a worker stays leased to its daemon: after a daemon is
#: killed, its messages wait this long (and up to ``recheck_interval`` more) before
#: another daemon takes them again. Far longer than a daemon keeps one (100 ms at most,
#: see ``take_ahead``), so that a slow database does not let a lease lapse under way.
DEFAULT_LEASE_S = 5.0
#: Send room reserved (send windows) lapses this long after it was last reserved on its
#: channel: a live daemon's layers use it or give it back within 0.4 s, so only a dead
#: daemon's (or a client stalled this long with room in hand) grows this old.
DEFAULT_ROOM_LAPSE_S = 10.0
MIN_LEASE_S = 1.0

_SCHEMES = ("postgresql", "postgres")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

#: Session settings unless the URL sets them. Connections name themselves in
#: pg_stat_activity, and JIT only slows these small queries. ``synchronous_commit`` is
#: left to the server (``on`` by default): a send is answered once it is on disk, and
#: sends that come together share one commit (``group_commit``). The URL may say
#: ``synchronous_commit=off`` to trade the last ~0.6 s of sends before a PostgreSQL
#: crash for faster commits (see docs/postgres.md).
_SERVER_SETTINGS = {
    "application_name": "channels-broker",
    "jit": "off",
}


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """What a ``postgresql://`` URL says; ``dsn`` is the URL without our own options."""

    dsn: str
    schema: str = DEFAULT_SCHEMA
    migrate: bool = True
    unlogged: bool = False
    pool_size: int = DEFAULT_POOL_SIZE
    recheck_s: float = DEFAULT_RECHECK_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    #: Messages a busy normal channel's takes remove ahead (``take_ahead``); 0: none.
    prefetch: int = DEFAULT_PREFETCH
    #: Seconds a message taken for a worker stays leased to this daemon.
    lease_s: float = DEFAULT_LEASE_S
    #: Seconds send room stays counted after it was last reserved on its channel.
    room_lapse_s: float = DEFAULT_ROOM_LAPSE_S
    #: Session settings, ours only where the URL's query does not set the same name.
    server_settings: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_url(cls, url: str) -> PostgresOptions:
        """Parse ``url``; raise ``BackendError`` naming the bad part."""
        try:
            parts = urlsplit(url)
            query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as exc:
            raise BackendError(f"bad backend URL {redacted_url(url)!r}: {exc}") from exc
        if parts.scheme not in _SCHEMES:
            raise BackendError(f"not a postgresql:// URL: {redacted_url(url)!r}")
        ours = {key: value for key, value in query if key in _OPTION_PARSERS}
        rest = [(key, value) for key, value in query if key not in _OPTION_PARSERS]
        dsn = urlunsplit(parts._replace(query=urlencode(rest), fragment=""))
        given = {key for key, _ in rest}
        settings = tuple((k, v) for k, v in _SERVER_SETTINGS.items() if k not in given)
        options = cls(dsn=dsn, server_settings=settings)
        for key, value in ours.items():
            options = replace(options, **{_OPTION_FIELDS[key]: _OPTION_PARSERS[key](key, value)})
        return options


def _parse_schema(key: str, value: str) -> str:
    if not _SCHEMA_NAME.match(value):
        raise BackendError(f"{key}={value!r}: use lowercase letters, digits and _ (63 at most)")
    return value


def _parse_bool(key: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BackendError(f"{key}={value!r}: use true or false")


def _parse_positive(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise BackendError(f"{key}={value!r}: use a positive number")
    return number


def _parse_whole(key: str, value: str) -> int:
    if not value.isdigit() or int(value) > MAX_PREFETCH:
        raise BackendError(f"{key}={value!r}: use a whole number from 0 to {MAX_PREFETCH}")
    return int(value)


def _parse_lease(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number >= MIN_LEASE_S:
        raise BackendError(f"{key}={value!r}: use a number of seconds of at least {MIN_LEASE_S:g}")
    return number


def _parse_count(key: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise BackendError(f"{key}={value!r}: use a whole number of at least 1")
    return int(value)


_OPTION_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "schema": _parse_schema,
    "migrate": _parse_bool,
    "unlogged": _parse_bool,
    "pool_size": _parse_count,
    "recheck_interval": _parse_positive,
    "timeout": _parse_positive,
    "prefetch": _parse_whole,
    "lease": _parse_lease,
    "room_lapse": _parse_positive,
}
_OPTION_FIELDS = {
    "schema": "schema",
    "migrate": "migrate",
    "unlogged": "unlogged",
    "pool_size": "pool_size",
    "recheck_interval": "recheck_s",
    "timeout": "timeout_s",
    "prefetch": "prefetch",
    "lease": "lease_s",
    "room_lapse": "room_lapse_s",
}
