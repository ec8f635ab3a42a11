"""The daemon's settings as one frozen value, checked on construction, and the table of
``serve`` options it is made from.

Each option is written once, in ``SERVE_OPTIONS``: ``broker.cli`` makes the click
options (flag, environment variable, TOML key, default, help) from it, and ``Config``
takes its defaults from it.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    LARGEST_CAPACITY,
    LARGEST_MAX_MESSAGE_BYTES,
    LONGEST_EXPIRY_S,
    MAX_ACK_PAIRS,
    SMALLEST_MAX_MESSAGE_BYTES,
    FrameDecoder,
    max_request_frame_bytes,
)

from .errors import ConfigError

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_METRICS_LISTEN",
    "ENV_PREFIX",
    "POSTGRES_SCHEMES",
    "SERVE_OPTIONS",
    "Config",
    "Option",
    "is_loopback",
    "parse_host_port",
    "serve_option",
]
DEFAULT_LISTEN = "127.0.0.1:7733"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9733"
#: Every option also reads ``CHANNELS_BROKER_<OPTION>`` from the environment.
ENV_PREFIX = "CHANNELS_BROKER_"
#: The backends with a schema, the only ones ``--no-migrate`` and ``migrate`` apply to.
POSTGRES_SCHEMES = ("postgresql", "postgres")

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Option:
    """One ``serve`` option: what click declares and the ``Config`` field it sets.

    click takes the value's type from ``default``; a tuple default makes the option
    repeatable, a bool default an on/off flag.
    """

    #: The flag without its dashes; also the TOML key and the environment variable's tail.
    name: str
    default: Any
    help: str | None = None
    choices: tuple[str, ...] = ()
    #: Whether ``choices`` match in any case (``INFO`` for ``info``).
    ignores_case: bool = False
    #: The ``Config`` field it sets, when not ``key`` (a unit suffix).
    config_field: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def key(self) -> str:
        """The name click passes the value under, and ``Config.from_options`` reads."""
        return self.name.replace("-", "_")

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def field_name(self) -> str:
        return self.config_field or self.key

    @property
    def is_repeatable(self) -> bool:
        return isinstance(self.default, tuple)

    @property
    def is_flag(self) -> bool:
        return isinstance(self.default, bool)


SERVE_OPTIONS: tuple[Option, ...] = (
    Option("listen", (DEFAULT_LISTEN,), "TCP host:port; repeatable."),
    Option("unix", (), "Unix socket path to listen on; repeatable."),
    Option("backend", "memory://", "memory://, redis://..., postgresql://..."),
    Option("metrics-listen", DEFAULT_METRICS_LISTEN, "host:port, or 'off'."),
    Option(
        "token",
        None,
        "Shared secret clients must present (a flag shows in ps: prefer"
        " CHANNELS_BROKER_TOKEN or --token-file).",
    ),
    Option(
        "token-file",
        None,
        "File of tokens, one per line: TOKEN NAMESPACE (* for any); re-read on SIGHUP.",
    ),
    Option(
        "allow-unauthenticated",
        False,
        "Listen beyond loopback although no token is set.",
    ),
    Option("log-level", "info", choices=_LOG_LEVELS, ignores_case=True),
    Option("log-format", "text", choices=_LOG_FORMATS),
    Option("max-message-bytes", DEFAULT_MAX_MESSAGE_BYTES),
    Option(
        "shutdown-timeout",
        10.0,
        "Seconds to finish on SIGTERM.",
        config_field="shutdown_timeout_s",
    ),
    Option("tls-cert", None, "PEM certificate chain: TCP listeners speak TLS."),
    Option("tls-key", None, "PEM private key for --tls-cert."),
    Option(
        "tls-client-ca",
        None,
        "PEM CA bundle: TCP clients must show a certificate it signed (mutual TLS).",
    ),
    # Bounds the daemon sets, whatever a client asks (README, Security).
    Option("max-capacity", 10_000, "Largest capacity a client may give a channel."),
    Option(
        "max-expiry",
        86_400.0,
        "Longest message expiry a client may ask, in seconds.",
        config_field="max_expiry_s",
    ),
    Option(
        "max-group-expiry",
        604_800.0,
        "Longest group membership expiry a client may ask, in seconds.",
        config_field="max_group_expiry_s",
    ),
    # 16: a site uses a handful, and each costs every send to a channel name not seen
    # lately its share of a match (up to 0.2 ms for 16 hostile ones; see daemon/capacity).
    Option("max-patterns", 16, "Most channel_capacity patterns one client may send."),
    # 1,000: a frame of 1,000 items is under a millisecond of the daemon's time; the
    # layer sends ACKs of at most 256 pairs (MAX_ACK_PAIRS) and no SEND_MANY.
    Option(
        "max-batch",
        1_000,
        "Most items in one frame: SEND_MANY messages, ACK pairs, HELLO patterns.",
    ),
    Option("max-pulls", 10_000, "Most pending RECEIVEs on one connection."),
    Option("max-memberships", 100_000, "Most group memberships one client may hold."),
    Option(
        "max-input-bytes",
        16 * 1024 * 1024,
        "Bytes of requests read from one connection and not yet handled before reading pauses.",
    ),
    Option(
        "max-output-bytes",
        64 * 1024 * 1024,
        "Bytes one connection may leave unread before the daemon closes it.",
    ),
    Option(
        "max-memory",
        512 * 1024 * 1024,
        "Bytes of waiting messages the memory backend may hold; past it, sends are full.",
    ),
    Option("max-connections", 10_000, "Most client connections the daemon holds."),
    Option("max-connections-per-peer", 1_000, "Most client connections from one IP address."),
    Option(
        "hello-timeout",
        10.0,
        "Seconds a new connection has to say HELLO.",
        config_field="hello_timeout_s",
    ),
    Option(
        "no-migrate",
        False,
        "Do not create or upgrade the PostgreSQL schema at start (see 'migrate').",
    ),
)


def serve_option(name: str) -> Option:
    """The row of ``SERVE_OPTIONS`` named ``name`` (``"metrics-listen"``); KeyError if none."""
    for option in SERVE_OPTIONS:
        if option.name == name:
            return option
    raise KeyError(name)


def _default(field_name: str) -> Any:
    """The default of the option that sets ``Config.<field_name>``."""
    for option in SERVE_OPTIONS:
        if option.field_name == field_name:
            return option.default
    raise KeyError(field_name)


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:7733`` for IPv6); raise ``ConfigError`` if invalid."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{value!r} is not host:port")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a ``--listen`` address, or a peer's) is this machine only; a
    name other than ``localhost`` is not: it may resolve to any address."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # fe80::1%eth0: its scope
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, from a dual-stack socket
    return (mapped or address).is_loopback


def _without_migration(url: str) -> str:
    """``url`` telling a PostgreSQL backend not to migrate; other backends have no schema."""
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        return url
    return urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, "migrate=false"]))))


@dataclass(frozen=True)
class Config:
    """Everything ``channels-broker serve`` needs, already validated."""

    listen: tuple[str, ...] = _default("listen")
    unix: tuple[str, ...] = _default("unix")
    #: The backend's URL as given; the daemon opens ``backend_url``.
    backend: str = _default("backend")
    metrics_listen: str | None = _default("metrics_listen")
    token: str | None = _default("token")
    log_level: str = _default("log_level")
    log_format: str = _default("log_format")
    max_message_bytes: int = _default("max_message_bytes")
    shutdown_timeout_s: float = _default("shutdown_timeout_s")
    #: Certificate chain and key (PEM); when given, every TCP listener speaks TLS.
    tls_cert: str | None = _default("tls_cert")
    tls_key: str | None = _default("tls_key")
    #: PostgreSQL: leave the schema as it is at start (``backend_url`` says migrate=false).
    no_migrate: bool = _default("no_migrate")
    token_file: str | None = _default("token_file")
    allow_unauthenticated: bool = _default("allow_unauthenticated")
    #: CA bundle (PEM) that signs the client certificates TCP listeners require (mTLS).
    tls_client_ca: str | None = _default("tls_client_ca")
    max_capacity: int = _default("max_capacity")
    max_expiry_s: float = _default("max_expiry_s")
    max_group_expiry_s: float = _default("max_group_expiry_s")
    max_patterns: int = _default("max_patterns")
    max_batch: int = _default("max_batch")
    max_pulls: int = _default("max_pulls")
    max_memberships: int = _default("max_memberships")
    max_input_bytes: int = _default("max_input_bytes")
    max_output_bytes: int = _default("max_output_bytes")
    max_memory: int = _default("max_memory")
    max_connections: int = _default("max_connections")
    max_connections_per_peer: int = _default("max_connections_per_peer")
    hello_timeout_s: float = _default("hello_timeout_s")
    listen_addresses: tuple[tuple[str, int], ...] = field(init=False, default=())

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> Config:
        """The Config for ``serve``'s option values, keyed by ``Option.key``.

        Options missing from ``values`` take their defaults. Two are said as a user says
        them: ``off`` (or empty) for no metrics listener, an empty token for none.
        Raises ``ConfigError`` if a value is not valid.
        """
        given = {
            option.field_name: values.get(option.key, option.default) for option in SERVE_OPTIONS
        }
        given["listen"], given["unix"] = tuple(given["listen"]), tuple(given["unix"])
        if given["metrics_listen"] in ("", "off"):
            given["metrics_listen"] = None
        given["token"] = given["token"] or None
        given["log_level"] = given["log_level"].lower()
        return cls(**given)

    def __post_init__(self) -> None:
        if not self.listen and not self.unix:
            raise ConfigError("nothing to listen on: give --listen or --unix")
        addresses = tuple(parse_host_port(item) for item in self.listen)
        object.__setattr__(self, "listen_addresses", addresses)
        if self.metrics_listen is not None:
            parse_host_port(self.metrics_listen)
        if self.log_level.lower() not in _LOG_LEVELS:
            raise ConfigError(
                f"log level {self.log_level!r} is not one of {', '.join(_LOG_LEVELS)}"
            )
        if self.log_format not in _LOG_FORMATS:
            raise ConfigError(
                f"log format {self.log_format!r} is not one of {', '.join(_LOG_FORMATS)}"
            )
        if not SMALLEST_MAX_MESSAGE_BYTES <= self.max_message_bytes <= LARGEST_MAX_MESSAGE_BYTES:
            raise ConfigError("max message bytes must be between 1 KiB and 64 MiB")
        if self.shutdown_timeout_s < 0:
            raise ConfigError("shutdown timeout must not be negative")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.token and self.token_file:
            raise ConfigError(
                "give --token or --token-file, not both (a token for any namespace"
                " goes in the file with '*')"
            )
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        self._check_bounds()
        self._check_exposure()

    def _check_bounds(self) -> None:
        for option in SERVE_OPTIONS:
            if option.name.startswith("max-") or option.name == "hello-timeout":
                value = getattr(self, option.field_name)
                if not value > 0:
                    raise ConfigError(f"{option.flag} must be positive, not {value!r}")
        # What a client may ask must stay representable wherever it goes (protocol.limits).
        if self.max_capacity > LARGEST_CAPACITY:
            raise ConfigError(f"--max-capacity must be at most {LARGEST_CAPACITY}")
        for flag, value in (
            ("--max-expiry", self.max_expiry_s),
            ("--max-group-expiry", self.max_group_expiry_s),
        ):
            if value > LONGEST_EXPIRY_S:
                raise ConfigError(f"{flag} must be at most {LONGEST_EXPIRY_S} s (100 years)")
        if self.max_batch < MAX_ACK_PAIRS:
            raise ConfigError(f"--max-batch must be at least {MAX_ACK_PAIRS}: the layer's ACKs")
        if self.max_patterns > self.max_batch:
            raise ConfigError("--max-patterns must not be over --max-batch (items of one frame)")

    def _check_exposure(self) -> None:
        """Refuse a TCP listener other hosts reach unless clients prove who they are, or
        ``--allow-unauthenticated`` says no proof is wanted."""
        if self.is_authenticated or self.allow_unauthenticated:
            return
        exposed = [item for item in self.listen if not is_loopback(parse_host_port(item)[0])]
        if exposed:
            raise ConfigError(
                f"--listen {exposed[0]} is reachable from other hosts and no client has to"
                " prove who it is: give --token (or CHANNELS_BROKER_TOKEN), --token-file or"
                " --tls-client-ca; or --allow-unauthenticated to serve anyone who reaches it"
            )

    @property
    def is_authenticated(self) -> bool:
        """Whether clients must prove who they are: a token, or a client certificate."""
        return bool(self.token or self.token_file or self.tls_client_ca)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context, or None for plain TCP; ConfigError if unreadable.
        With ``tls_client_ca``, the handshake fails without a certificate that CA signed."""
        if not self.tls_cert or not self.tls_key:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
            if self.tls_client_ca:
                context.load_verify_locations(cafile=self.tls_client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate, key or client CA: {exc}") from exc
        return context

    @property
    def backend_url(self) -> str:
        """The URL the daemon opens its backend with: ``backend``, and migrate=false if asked."""
        return _without_migration(self.backend) if self.no_migrate else self.backend

    def frame_decoder(self) -> FrameDecoder:
        """A decoder for what clients send: frames of up to ``max_frame_bytes`` whose
        arrays hold up to ``max_batch`` items (``FrameOverLimit`` beyond)."""
        return FrameDecoder(self.max_frame_bytes, self.max_batch, "--max-batch")

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame the daemon accepts: a full message plus names and headers."""
        return max_request_frame_bytes(self.max_message_bytes)

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level.upper()]
