"""The daemon's settings as one frozen value, checked on construction."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field

from protocol import DEFAULT_MAX_FRAME_BYTES

from .errors import ConfigError

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_METRICS_LISTEN",
    "Config",
    "parse_host_port",
]

DEFAULT_LISTEN = "127.0.0.1:7733"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9733"
#: 4 MiB: four times what Channels requires to pass (1 MB), under the frame limit
#: with room for names and a group send's member list.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Room kept in a frame for everything but the payload.
FRAME_OVERHEAD_BYTES = 64 * 1024

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_LOG_FORMATS = ("text", "json")


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:7733`` for IPv6); raise ``ConfigError`` if invalid."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{value!r} is not host:port")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)


@dataclass(frozen=True)
class Config:
    """Everything ``channels-broker serve`` needs, already validated."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    unix: tuple[str, ...] = ()
    backend_url: str = "memory://"
    metrics_listen: str | None = DEFAULT_METRICS_LISTEN
    token: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    shutdown_timeout_s: float = 10.0
    #: Certificate chain and key (PEM); when given, every TCP listener speaks TLS.
    tls_cert: str | None = None
    tls_key: str | None = None
    listen_addresses: tuple[tuple[str, int], ...] = field(init=False, default=())

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
            raise ConfigError(f"log format {self.log_format!r} is not one of text, json")
        if not 1024 <= self.max_message_bytes <= 64 * 1024 * 1024:
            raise ConfigError("max message bytes must be between 1 KiB and 64 MiB")
        if self.shutdown_timeout_s < 0:
            raise ConfigError("shutdown timeout must not be negative")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context, or None for plain TCP; ConfigError if unreadable."""
        if not self.tls_cert or not self.tls_key:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate or key: {exc}") from exc
        return context

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame the daemon accepts: a full message plus names and headers."""
        return max(DEFAULT_MAX_FRAME_BYTES, self.max_message_bytes + FRAME_OVERHEAD_BYTES)

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level.upper()]
