"""Redis backend URLs: every form the daemon accepts, parsed into one settings value.

Forms (``[user][:password]@`` is optional everywhere; options go in the query):

* ``redis://host[:6379][/db]`` and ``rediss://...`` (TLS)
* ``redis+unix:///path/to/redis.sock[?db=N]`` (a Unix socket; plain ``unix://`` is the
  daemon's own listener syntax for clients, so the Redis form names Redis)
* ``redis+sentinel://host:26379[,host2:26379]/mastername[/db]`` (``rediss+sentinel`` for TLS
  to the data nodes; ``sentinel_username`` / ``sentinel_password`` authenticate to Sentinel)
* ``redis+cluster://host:port[,host2:port]`` (``rediss+cluster`` for TLS): Redis Cluster

Options: ``prefix`` (key prefix), ``db``, ``timeout`` (s, one operation), ``connect_timeout``
(s), ``health_check_interval`` (s, idle pub/sub ping), ``room_lapse`` (s: send room a dead
daemon reserved stops counting this long after its last change), ``client_name``, ``lease``
(s, a worker's message leased to its daemon until handed out), and for TLS
``ssl_cert_reqs`` (none/optional/required), ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_check_hostname``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

from backends import BackendError, redacted_url

__all__ = ["DEFAULT_PREFIX", "RedisMode", "RedisSettings"]

DEFAULT_PREFIX = "channels-broker"
#: One operation's deadline: long enough for a 1 MB payload on a busy server, short
#: enough that a client hears "backend unavailable" well before it gives up itself.
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_CONNECT_TIMEOUT_S = 2.0
#: An idle subscriber connection is pinged this often, so a silent network cut is
#: noticed (and the wake-ups resubscribed) within about this long.
DEFAULT_HEALTH_CHECK_S = 5.0
#: Send room lapses this long after its holder last changed it: a live daemon's layers
#: use it or give it back within 0.4 s, so only a dead daemon's (or a client stalled
#: this long with room in hand) grows this old.
DEFAULT_ROOM_LAPSE_S = 10.0
#: How long a message taken for a worker stays leased to its daemon (as PostgreSQL's
#: ``lease``): after a daemon or Redis fault, a message whose take went unanswered
#: waits this long (and up to a second more) before it is given back.
DEFAULT_LEASE_S = 5.0
MIN_LEASE_S = 1.0

_DEFAULT_PORT = 6379
_DEFAULT_SENTINEL_PORT = 26379
#: Key prefixes must not contain hash-tag braces or glob characters (flush SCANs by glob).
_prefix_pattern = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_SCHEMES = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "redis+unix": ("unix", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_SSL_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_KNOWN_OPTIONS = frozenset(
    {
        "prefix",
        "db",
        "timeout",
        "connect_timeout",
        "health_check_interval",
        "room_lapse",
        "client_name",
        "lease",
        "sentinel_username",
        "sentinel_password",
        "ssl_check_hostname",
        *_SSL_OPTIONS,
    }
)

RedisMode = str  # "standalone" | "unix" | "sentinel" | "cluster"


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where Redis is and how to talk to it; built by ``from_url``."""

    mode: RedisMode
    hosts: tuple[tuple[str, int], ...] = ()
    path: str = ""
    master_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    ssl: dict[str, str | bool] = field(default_factory=dict)
    prefix: str = DEFAULT_PREFIX
    timeout_s: float = DEFAULT_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    health_check_s: float = DEFAULT_HEALTH_CHECK_S
    room_lapse_s: float = DEFAULT_ROOM_LAPSE_S
    client_name: str = "channels-broker"
    #: Seconds a message taken for a worker stays leased to its daemon (``leases``).
    lease_s: float = DEFAULT_LEASE_S

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Parse any of the URL forms above; raise ``BackendError`` for a bad one."""
        try:
            parts = urlsplit(url)
            query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        except ValueError as exc:
            raise BackendError(f"bad Redis URL {redacted_url(url)!r}: {exc}") from exc
        if parts.scheme not in _SCHEMES:
            raise BackendError(f"not a Redis URL: {redacted_url(url)!r}")
        unknown = sorted(set(query) - _KNOWN_OPTIONS)
        if unknown:
            raise BackendError(f"unknown Redis URL options {unknown} in {redacted_url(url)!r}")
        mode, tls = _SCHEMES[parts.scheme]
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        username, password = _credentials(userinfo)
        try:
            values = _location(mode, hostinfo, parts.path, query)
            values.update(_options(query))
        except (ValueError, BackendError) as exc:
            raise BackendError(f"bad Redis URL {redacted_url(url)!r}: {exc}") from exc
        if mode == "cluster" and values.get("db", 0) != 0:
            raise BackendError("Redis Cluster has database 0 only")
        return cls(
            mode=mode,
            tls=tls,
            username=username,
            password=password,
            **values,  # type: ignore[arg-type]
        )


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise BackendError(f"no host in {text!r}")
    return host, int(port) if port else default_port


def _location(mode: str, hostinfo: str, path: str, query: dict[str, str]) -> dict[str, object]:
    segments = [unquote(s) for s in path.split("/") if s]
    db = int(query.get("db", 0))
    if mode == "unix":
        if hostinfo or not path.startswith("/"):
            raise BackendError("redis+unix:// takes an absolute socket path and no host")
        return {"path": unquote(path), "db": db}
    default_port = _DEFAULT_SENTINEL_PORT if mode == "sentinel" else _DEFAULT_PORT
    hosts = tuple(_host_port(item, default_port) for item in hostinfo.split(",") if item)
    if not hosts:
        raise BackendError("no host")
    if mode == "sentinel":
        if not segments:
            raise BackendError("redis+sentinel:// needs the master name as its path")
        if len(segments) > 1:
            db = int(segments[1])
        return {"hosts": hosts, "master_name": segments[0], "db": db}
    if mode == "standalone" and len(hosts) > 1:
        raise BackendError("redis:// takes one host (use redis+sentinel or redis+cluster)")
    if segments:
        db = int(segments[0])
    return {"hosts": hosts, "db": db}


def _lease(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number >= MIN_LEASE_S:
        raise BackendError(f"lease={value!r}: use a number of seconds of at least {MIN_LEASE_S:g}")
    return number


def _options(query: dict[str, str]) -> dict[str, object]:
    values: dict[str, object] = {}
    prefix = query.get("prefix", DEFAULT_PREFIX)
    if not _prefix_pattern.match(prefix):
        raise BackendError(f"prefix {prefix!r}: use 1-64 of A-Z a-z 0-9 _ . : -")
    values["prefix"] = prefix
    for name, key in (
        ("timeout", "timeout_s"),
        ("connect_timeout", "connect_timeout_s"),
        ("health_check_interval", "health_check_s"),
        ("room_lapse", "room_lapse_s"),
    ):
        if name in query:
            number = float(query[name])
            if not number > 0:
                raise BackendError(f"{name} must be positive")
            values[key] = number
    if "lease" in query:
        values["lease_s"] = _lease(query["lease"])
    for name in ("client_name", "sentinel_username", "sentinel_password"):
        if name in query:
            values[name] = query[name]
    ssl: dict[str, str | bool] = {key: query[key] for key in _SSL_OPTIONS if key in query}
    if "ssl_check_hostname" in query:
        ssl["ssl_check_hostname"] = query["ssl_check_hostname"].lower() in ("1", "true", "yes")
    values["ssl"] = ssl
    return values
