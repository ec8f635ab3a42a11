"""The daemon's settings as one frozen value, checked on construction; its defaults come
from the table of ``serve`` options (``broker.options``), re-exported here."""

from __future__ import annotations

import ipaddress
import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from protocol import (
    LARGEST_CAPACITY,
    LARGEST_MAX_MESSAGE_BYTES,
    LONGEST_EXPIRY_S,
    MAX_ACK_PAIRS,
    MAX_UNSETTLED_SENDS,
    SMALLEST_MAX_MESSAGE_BYTES,
    FrameDecoder,
    max_request_frame_bytes,
)

from .errors import ConfigError
from .options import (
    DEFAULT_LISTEN,
    DEFAULT_METRICS_LISTEN,
    ENV_PREFIX,
    LOG_FORMATS,
    LOG_LEVELS,
    LOOP_CHOICES,
    POSTGRES_SCHEMES,
    SERVE_OPTIONS,
    Option,
    default_of,
    serve_option,
)

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

#: One label of a host name (RFC 1123, and '_', which container names use).
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
#: How to give several --listen addresses, in each place an option's value comes from.
_MANY_ADDRESSES = (
    "one address per --listen: repeat the flag, separate them with spaces in"
    f" {ENV_PREFIX}LISTEN, or give a list in the TOML file"
)


def parse_host_port(value: str, option: str | None = None) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:7733`` for IPv6); raise ``ConfigError`` if invalid,
    saying which part is wrong (blamed on ``option``, a ``serve`` option's name)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        hint = f": give its address too, as 127.0.0.1:{value} or 0.0.0.0:{value}"
        raise ConfigError(f"{value!r} is not host:port{hint if value.isdigit() else ''}", option)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        reason = f"{port_text!r} is not a port number (0 to 65535)"
        raise ConfigError(f"{value!r} is not host:port: {reason}", option)
    host = host.strip("[]") or "127.0.0.1"
    if not _is_host(host):
        reason = f"{host!r} is not an IP address or a host name"
        if "," in host or " " in host:
            reason += f" ({_MANY_ADDRESSES})" if option == "listen" else " (one address only)"
        raise ConfigError(f"{value!r} is not host:port: {reason}", option)
    return host, int(port_text)


def _is_host(host: str) -> bool:
    """Whether ``host`` is an IP address or could be a host name (letters, digits, '-' and
    '_' in dot-separated labels): what to try to bind, before a resolver says more."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # fe80::1%eth0: its scope
        return True
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


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

    listen: tuple[str, ...] = default_of("listen")
    unix: tuple[str, ...] = default_of("unix")
    #: The backend's URL as given; the daemon opens ``backend_url``.
    backend: str = default_of("backend")
    metrics_listen: str | None = default_of("metrics_listen")
    token: str | None = default_of("token")
    log_level: str = default_of("log_level")
    log_format: str = default_of("log_format")
    max_message_bytes: int = default_of("max_message_bytes")
    shutdown_timeout_s: float = default_of("shutdown_timeout_s")
    #: Certificate chain and key (PEM); when given, every TCP listener speaks TLS.
    tls_cert: str | None = default_of("tls_cert")
    tls_key: str | None = default_of("tls_key")
    #: PostgreSQL: leave the schema as it is at start (``backend_url`` says migrate=false).
    no_migrate: bool = default_of("no_migrate")
    token_file: str | None = default_of("token_file")
    allow_unauthenticated: bool = default_of("allow_unauthenticated")
    #: CA bundle (PEM) that signs the client certificates TCP listeners require (mTLS).
    tls_client_ca: str | None = default_of("tls_client_ca")
    max_capacity: int = default_of("max_capacity")
    max_expiry_s: float = default_of("max_expiry_s")
    max_group_expiry_s: float = default_of("max_group_expiry_s")
    max_patterns: int = default_of("max_patterns")
    max_batch: int = default_of("max_batch")
    max_pulls: int = default_of("max_pulls")
    max_memberships: int = default_of("max_memberships")
    max_channels: int = default_of("max_channels")
    max_input_bytes: int = default_of("max_input_bytes")
    max_output_bytes: int = default_of("max_output_bytes")
    max_memory: int = default_of("max_memory")
    #: Send room per channel an OK may grant; 0 turns send windows off (docs/flow.md).
    send_window: int = default_of("send_window")
    confirm_delay_s: float = default_of("confirm_delay_s")
    max_send_room: int = default_of("max_send_room")
    max_connections: int = default_of("max_connections")
    max_connections_per_peer: int = default_of("max_connections_per_peer")
    hello_timeout_s: float = default_of("hello_timeout_s")
    #: ``auto``, ``asyncio`` or ``uvloop``; ``broker.daemon.loops`` resolves ``auto``.
    loop: str = default_of("loop")
    #: memory:// only: where SIGTERM writes the store and the next start reads it.
    state_file: str | None = default_of("state_file")
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
            raise ConfigError("nothing to listen on: give --listen or --unix", "listen")
        addresses = tuple(parse_host_port(item, "listen") for item in self.listen)
        object.__setattr__(self, "listen_addresses", addresses)
        if self.metrics_listen is not None:
            parse_host_port(self.metrics_listen, "metrics-listen")
        if self.log_level.lower() not in LOG_LEVELS:
            levels = ", ".join(LOG_LEVELS)
            raise ConfigError(f"log level {self.log_level!r} is not one of {levels}", "log-level")
        if self.log_format not in LOG_FORMATS:
            formats = ", ".join(LOG_FORMATS)
            message = f"log format {self.log_format!r} is not one of {formats}"
            raise ConfigError(message, "log-format")
        if self.loop not in LOOP_CHOICES:
            loops = ", ".join(LOOP_CHOICES)
            raise ConfigError(f"loop {self.loop!r} is not one of {loops}", "loop")
        if not SMALLEST_MAX_MESSAGE_BYTES <= self.max_message_bytes <= LARGEST_MAX_MESSAGE_BYTES:
            value = self.max_message_bytes
            message = f"--max-message-bytes must be between 1 KiB and 64 MiB, not {value}"
            raise ConfigError(message, "max-message-bytes")
        if self.shutdown_timeout_s < 0:
            raise ConfigError("shutdown timeout must not be negative", "shutdown-timeout")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.token and self.token_file:
            raise ConfigError(
                "give --token or --token-file, not both (a token for any namespace"
                " goes in the file with '*')"
            )
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key", "tls-client-ca")
        self._check_bounds()
        self._check_exposure()
        self._check_state_file()

    def _check_bounds(self) -> None:
        for option in SERVE_OPTIONS:
            if option.name.startswith("max-") or option.name == "hello-timeout":
                value = getattr(self, option.field_name)
                if not value > 0:
                    raise ConfigError(f"{option.flag} must be positive, not {value!r}", option.name)
        # What a client may ask must stay representable wherever it goes (protocol.limits).
        if self.max_capacity > LARGEST_CAPACITY:
            message = f"--max-capacity must be at most {LARGEST_CAPACITY}"
            raise ConfigError(message, "max-capacity")
        for name, value in (
            ("max-expiry", self.max_expiry_s),
            ("max-group-expiry", self.max_group_expiry_s),
        ):
            if value > LONGEST_EXPIRY_S:
                message = f"--{name} must be at most {LONGEST_EXPIRY_S} s (100 years)"
                raise ConfigError(message, name)
        if not 0 <= self.send_window <= MAX_UNSETTLED_SENDS // 4:
            raise ConfigError(
                f"--send-window must be between 0 and {MAX_UNSETTLED_SENDS // 4}: a layer"
                f" leaves up to four windows, {MAX_UNSETTLED_SENDS} sends, unconfirmed",
                "send-window",
            )
        if not 0 <= self.confirm_delay_s <= 1:
            message = "--confirm-delay must be between 0 and 1 s: the client waits on it"
            raise ConfigError(message, "confirm-delay")
        if self.max_batch < MAX_ACK_PAIRS:
            message = f"--max-batch must be at least {MAX_ACK_PAIRS}: the layer's ACKs"
            raise ConfigError(message, "max-batch")
        if self.max_patterns > self.max_batch:
            message = "--max-patterns must not be over --max-batch (items of one frame)"
            raise ConfigError(message, "max-patterns")
        if self.max_output_bytes < 2 * self.max_message_bytes:
            raise ConfigError(
                f"--max-output-bytes ({self.max_output_bytes}) must be at least twice "
                f"--max-message-bytes ({self.max_message_bytes}): a reader must be able to "
                "leave one message unread while the next is written",
                "max-output-bytes",
            )

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
                " --tls-client-ca; or --allow-unauthenticated to serve anyone who reaches it",
                "listen",
            )

    def _check_state_file(self) -> None:
        scheme = urlsplit(self.backend).scheme
        if self.state_file and scheme != "memory":
            raise ConfigError(
                f"--state-file keeps the memory backend's state; {scheme}:// keeps its own"
                " (this daemon holds none of it): drop --state-file",
                "state-file",
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
