"""The layer's settings (``CHANNEL_LAYERS[...]["CONFIG"]``) as one frozen value."""

from __future__ import annotations

import fnmatch
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from protocol import PROTOCOL_VERSION, Hello

__all__ = ["DEFAULT_HOSTS", "Host", "LayerSettings", "capacity_patterns", "host_url", "parse_host"]

DEFAULT_HOSTS = ("tcp://127.0.0.1:7733",)

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
    #: For tls:// hosts; None verifies the daemon against the system's CAs.
    ssl_context: ssl.SSLContext | None

    def hello(self, client_id: str, secret: bytes, send_window: int = 0) -> Hello:
        """The HELLO frame of a connection for ``client_id``, proven by ``secret``, that
        can use ``send_window`` (``broker.layer.window``)."""
        return Hello(
            PROTOCOL_VERSION,
            self.token,
            client_id,
            self.prefix,
            self.capacity,
            self.expiry_s,
            self.group_expiry_s,
            self.channel_capacity,
            secret,
            send_window,
        )

    def tls_for(self, host: Host) -> ssl.SSLContext | None:
        """The TLS context to open ``host`` with, or None for plain TCP and unix sockets."""
        if host[0] != "tls":
            return None
        return self.ssl_context or ssl.create_default_context()

    def host_names(self) -> str:
        """The hosts as the settings wrote them, for error messages."""
        return ", ".join(host_url(host) for host in self.hosts)
