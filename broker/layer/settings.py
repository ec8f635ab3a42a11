"""The layer's settings (``CHANNEL_LAYERS[...]["CONFIG"]``): checked, then one frozen value."""

from __future__ import annotations

import fnmatch
import math
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from protocol import PROTOCOL_VERSION, Hello, is_valid_group

from .carryover import FOREIGN_KEYS, foreign_key_problems, is_redis_address, redis_address_problem
from .problems import BAD_VALUE, UNKNOWN_KEY, LayerConfigError, Problem

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_HOSTS",
    "Host",
    "LayerSettings",
    "capacity_patterns",
    "config_problems",
    "host_url",
    "parse_host",
    "refuse_bad_config",
]

DEFAULT_HOSTS = ("tcp://127.0.0.1:7733",)
#: Every key of CONFIG, as ``BrokerChannelLayer`` takes them (docs/django.md).
CONFIG_KEYS = (
    "hosts",
    "token",
    "prefix",
    "capacity",
    "expiry",
    "group_expiry",
    "channel_capacity",
    "symmetric_encryption_keys",
    "max_message_bytes",
    "connect_timeout",
    "ssl_context",
    "remembered_memberships",
)
#: Keys whose None means their default.
_OPTIONAL = frozenset({"hosts", "token", "channel_capacity", "max_message_bytes", "ssl_context"})
_HOST_FORMS = (
    "tcp://host:port (the daemon's --listen), tls://host:port or unix:///path (its --unix)"
)

#: (scheme, host or socket path, port): ("tcp", "127.0.0.1", 7733), ("unix", "/run/b.sock", 0).
Host = tuple[str, str, int]


def parse_host(url: str) -> Host:
    """``tcp://h:p``, ``tls://h:p`` or ``unix:///path``; raise ``ValueError`` otherwise."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{url!r}: a unix host needs a path, as unix:///run/broker.sock")
        return "unix", parts.path, 0
    if parts.scheme in ("tcp", "tls") and parts.hostname and parts.port:
        return parts.scheme, parts.hostname, parts.port
    raise ValueError(f"{url!r} is not tcp://host:port, tls://host:port or unix:///path")


def host_url(host: Host) -> str:
    """``host`` as the settings wrote it: ``tcp://127.0.0.1:7733``, ``unix:///run/b.sock``."""
    scheme, address, port = host
    if scheme == "unix":
        return f"unix://{address}"
    return f"{scheme}://[{address}]:{port}" if ":" in address else f"{scheme}://{address}:{port}"


def capacity_patterns(channel_capacity: Mapping[Any, int]) -> tuple[tuple[str, int], ...]:
    """``channel_capacity`` as HELLO carries it: (regular expression, capacity), in order.

    A compiled pattern goes as written. A glob (a str key) goes as Channels matches it,
    ``fnmatch.translate``, less the atomic groups Python 3.11+ wraps around each
    ``.*?X`` for speed: the daemon's matcher (RE2) has no need of them and does not read
    them, and since fnmatch ends with ``.*`` or a literal, they change nothing matched.
    """
    return tuple((_pattern_of(key), capacity) for key, capacity in channel_capacity.items())


def _pattern_of(key: Any) -> str:
    if hasattr(key, "match"):
        pattern: str = key.pattern
        return pattern
    return _without_atomic_groups(fnmatch.translate(key))


def _without_atomic_groups(pattern: str) -> str:
    """``(?>`` as ``(?:`` wherever it opens a group (not escaped, not in a class)."""
    out, index, in_class = [], 0, False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            out.append(pattern[index : index + 2])
            index += 2
            continue
        if in_class:
            in_class = char != "]" or out[-1] == "[" or out[-1] == "[^"
        elif char == "[":
            in_class = True
            if pattern.startswith("^", index + 1):  # "[^": one token, so "]" next is literal
                char, index = "[^", index + 1
        elif pattern.startswith("(?>", index):
            char, index = "(?:", index + 2
        out.append(char)
        index += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class LayerSettings:
    """What every event loop's client of one layer needs to know, checked once."""

    hosts: tuple[Host, ...]
    token: str
    prefix: str
    capacity: int
    expiry_s: float
    group_expiry_s: float
    #: (regular expression, capacity) pairs, first match wins, as HELLO carries them.
    channel_capacity: tuple[tuple[str, int], ...]
    #: The application's own cap on message size, under the daemon's; None: the daemon's.
    max_message_bytes: int | None
    connect_timeout_s: float
    #: How many of its memberships the layer re-adds to a daemon that lost its store.
    remembered_memberships: int
    #: For tls:// hosts; None verifies the daemon against the system's CAs.
    ssl_context: ssl.SSLContext | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LayerSettings:
        """The settings of a layer made with ``config``: its parameters (every key of
        ``CONFIG_KEYS``, defaults filled in) and whatever other keys it was given.

        Raises ``LayerConfigError`` naming every problem (``config_problems``).
        """
        refuse_bad_config(config)
        return cls(
            hosts=tuple(parse_host(host) for host in (config["hosts"] or DEFAULT_HOSTS)),
            token=config["token"] or "",
            prefix=config["prefix"],
            capacity=config["capacity"],
            expiry_s=float(config["expiry"]),
            group_expiry_s=float(config["group_expiry"]),
            channel_capacity=capacity_patterns(config["channel_capacity"] or {}),
            max_message_bytes=config["max_message_bytes"],
            connect_timeout_s=float(config["connect_timeout"]),
            ssl_context=config["ssl_context"],
            remembered_memberships=config["remembered_memberships"],
        )

    def hello(
        self,
        client_id: str,
        secret: bytes,
        send_window: int = 0,
        wants_incarnation: bool = False,
        acks_deliveries: bool = False,
        version: int = PROTOCOL_VERSION,
    ) -> Hello:
        """The HELLO frame of a connection for ``client_id``, proven by ``secret``, that
        can use ``send_window`` (``broker.layer.window``), reads WELCOME's incarnation
        if ``wants_incarnation`` (``broker.layer.memberships``) and, ``acks_deliveries``,
        acknowledges each DELIVER's lease (``broker.layer.pulls``), in ``version``."""
        return Hello(
            version,
            self.token,
            client_id,
            self.prefix,
            self.capacity,
            self.expiry_s,
            self.group_expiry_s,
            self.channel_capacity,
            secret,
            send_window,
            wants_incarnation,
            acks_deliveries,
        )

    def tls_for(self, host: Host) -> ssl.SSLContext | None:
        """The TLS context to open ``host`` with, or None for plain TCP and unix sockets."""
        if host[0] != "tls":
            return None
        return self.ssl_context or ssl.create_default_context()

    def host_names(self) -> str:
        """The hosts as the settings wrote them, for error messages."""
        return ", ".join(host_url(host) for host in self.hosts)


def refuse_bad_config(config: Mapping[str, Any]) -> None:
    """Raise ``LayerConfigError`` naming every problem of ``config``, if it has any."""
    problems = config_problems(config)
    if problems:
        raise LayerConfigError(problems)


def config_problems(config: object) -> list[Problem]:
    """Every problem of a CONFIG (an absent key takes its default), each with what to write
    instead; empty when the layer can use it. ``symmetric_encryption_keys`` is checked
    where it is used, by ``broker.layer.encryption.encryption_for``."""
    if not isinstance(config, Mapping):
        what = f"CONFIG is a {type(config).__name__}"
        return [
            Problem(
                "CONFIG", what, f'write a dict, as {{"hosts": ["{DEFAULT_HOSTS[0]}"]}}', BAD_VALUE
            )
        ]
    problems = _hosts_problems(config.get("hosts"))
    for key, check in _VALUE_CHECKS.items():
        value = config.get(key)
        if key not in config or (value is None and key in _OPTIONAL):
            continue
        why = check(value)
        if why is not None:
            problems.append(Problem(key, f"{key} {value!r} {why[0]}", why[1], BAD_VALUE))
    return problems + foreign_key_problems(config) + _unknown_key_problems(config)


def _hosts_problems(hosts: object) -> list[Problem]:
    """The problems of ``hosts``: a list of daemon addresses (None: the default)."""
    if hosts is None:
        return []
    if isinstance(hosts, Mapping) or _is_address_pair(hosts):
        return [redis_address_problem("hosts", hosts)]
    if isinstance(hosts, str):
        if is_redis_address(hosts):
            return [redis_address_problem("hosts", hosts)]
        listed = Problem(
            "hosts",
            f"hosts is one str, {hosts!r}",
            f'write a list: "hosts": ["{hosts}"]',
            BAD_VALUE,
        )
        return [listed, *_entry_problems([hosts])]
    if not isinstance(hosts, Iterable):
        what = f"hosts is a {type(hosts).__name__}"
        return [Problem("hosts", what, f'write a list, as ["{DEFAULT_HOSTS[0]}"]', BAD_VALUE)]
    return _entry_problems(hosts)


def _is_address_pair(hosts: object) -> bool:
    """``("127.0.0.1", 6379)`` given as ``hosts`` itself rather than inside a list."""
    return isinstance(hosts, tuple) and len(hosts) == 2 and isinstance(hosts[1], int)


def _entry_problems(hosts: Iterable[Any]) -> list[Problem]:
    problems = []
    for index, entry in enumerate(hosts):
        key = f"hosts[{index}]"
        if is_redis_address(entry):
            problems.append(redis_address_problem(key, entry))
            continue
        try:
            parse_host(entry)
        except (ValueError, TypeError, AttributeError):
            problems.append(
                Problem(
                    key, f"{key}, {entry!r}, is not a daemon address", _host_hint(entry), BAD_VALUE
                )
            )
    return problems


def _host_hint(entry: object) -> str:
    if isinstance(entry, str) and "://" not in entry and ":" in entry:
        return f'write "tcp://{entry}"'
    return f"write {_HOST_FORMS}"


#: A check's answer: None, or (what is wrong with the value, what to write instead).
Why = tuple[str, str] | None


def _seconds(hint: str, zero: str = "is not a number of seconds above 0") -> Callable[[Any], Why]:
    def check(value: Any) -> Why:
        if type(value) in (int, float) and 0 < value < math.inf:
            return None
        return zero if value == 0 else "is not a number of seconds above 0", hint

    return check


def _count(hint: str) -> Callable[[Any], Why]:
    def check(value: Any) -> Why:
        if type(value) is int and value >= 1:
            return None
        return "is not a whole number above 0", hint

    return check


def _token(value: Any) -> Why:
    return None if isinstance(value, str) else ("is not a str", "write the daemon's --token")


def _prefix(value: Any) -> Why:
    if is_valid_group(value):
        return None
    kept = re.sub(r"[^A-Za-z0-9_.\-]", "", str(value))[:99] or "asgi"
    return (
        "is not a namespace name",
        f"it names this site's channels and groups on the daemon: letters, digits, '-', '_'"
        f" and '.', under 100 characters, as {kept!r}",
    )


def _channel_capacity(value: Any) -> Why:
    hint = 'write globs or compiled patterns to counts, as {"http.request": 200}'
    if not isinstance(value, Mapping):
        return "is not a dict", hint
    for key, capacity in value.items():
        if not (isinstance(key, str) or isinstance(getattr(key, "pattern", None), str)):
            return f"has the key {key!r}, neither a glob nor a compiled pattern", hint
        if type(capacity) is not int or capacity < 1:
            return f"gives {key!r} {capacity!r}, not a whole number above 0", hint
    return None


def _ssl_context(value: Any) -> Why:
    if isinstance(value, ssl.SSLContext):
        return None
    return (
        "is not an ssl.SSLContext",
        "write ssl.create_default_context(cafile=...) (docs/security.md)",
    )


_VALUE_CHECKS: dict[str, Callable[[Any], Why]] = {
    "token": _token,
    "prefix": _prefix,
    "capacity": _count("write how many messages may wait per channel, as 100"),
    "expiry": _seconds("write how long a message waits for a reader, in seconds, as 60"),
    "group_expiry": _seconds(
        "write how long a membership lasts, in seconds, as 86400 (the default)",
        "would end every membership at once (channels_postgres reads 0 as never)",
    ),
    "channel_capacity": _channel_capacity,
    "max_message_bytes": _count(
        "write the largest message to send, in bytes, or None for the daemon's"
    ),
    "connect_timeout": _seconds("write how long a call waits for a daemon, in seconds, as 5"),
    "ssl_context": _ssl_context,
    "remembered_memberships": _count(
        "write how many memberships the layer re-adds after a daemon lost them, as 100000"
    ),
}


def _unknown_key_problems(config: Mapping[Any, Any]) -> list[Problem]:
    import difflib  # only for a mistake: every Django process imports this module

    problems = []
    for key in config:
        if key in CONFIG_KEYS or key in FOREIGN_KEYS:
            continue
        close = difflib.get_close_matches(str(key).lower(), CONFIG_KEYS, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        hint = f"{guess}the keys are {', '.join(CONFIG_KEYS)} (docs/django.md)"
        problems.append(Problem(str(key), f"unknown CONFIG key {key!r}", hint, UNKNOWN_KEY))
    return problems
