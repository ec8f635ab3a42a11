"""The options of ``channels-broker serve``, each written once: ``broker.cli`` makes the
click options (flag, environment variable, TOML key, default, help) from this table, and
``broker.config.Config`` takes its defaults from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import DEFAULT_MAX_MESSAGE_BYTES

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_METRICS_LISTEN",
    "ENV_PREFIX",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LOOP_CHOICES",
    "POSTGRES_SCHEMES",
    "SERVE_OPTIONS",
    "Option",
    "default_of",
    "serve_option",
]

DEFAULT_LISTEN = "127.0.0.1:7733"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9733"
#: Every option also reads ``CHANNELS_BROKER_<OPTION>`` from the environment.
ENV_PREFIX = "CHANNELS_BROKER_"
#: The backends with a schema, the only ones ``--no-migrate`` and ``migrate`` apply to.
POSTGRES_SCHEMES = ("postgresql", "postgres")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")
#: ``auto`` is uvloop when it is installed (``pip install 'channels-broker[uvloop]'``).
LOOP_CHOICES = ("auto", "asyncio", "uvloop")


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
    Option("log-level", "info", choices=LOG_LEVELS, ignores_case=True),
    Option("log-format", "text", choices=LOG_FORMATS),
    Option(
        "loop", "auto", "Event loop: auto (uvloop when installed), asyncio, uvloop.", LOOP_CHOICES
    ),
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
    # lately its share of a match (up to 1 ms for 16 hostile ones; see daemon/capacity).
    Option("max-patterns", 16, "Most channel_capacity patterns one client may send."),
    # 1,000: a frame of 1,000 items is under a millisecond of the daemon's time; the
    # layer sends ACKs of at most 256 pairs (MAX_ACK_PAIRS) and no SEND_MANY.
    Option(
        "max-batch",
        1_000,
        "Most items in one frame: SEND_MANY messages, ACK pairs, HELLO patterns.",
    ),
    # A worker pulls a few channels at once; 10,000 pending RECEIVEs cost about 10 MB.
    Option("max-pulls", 10_000, "Most pending RECEIVEs on one connection."),
    # A Daphne process of 10,000 consumers in 5 groups holds 50,000; about 400 bytes each.
    Option(
        "max-memberships",
        100_000,
        "Most group memberships one connection may hold (made by it and not discarded).",
    ),
    # A consumer holds a message of its own channel from its push until it reads it:
    # 10,000 channels at once is far beyond a Daphne process's consumers; past it, the
    # messages of further channels wait in storage. About 200 bytes each.
    Option(
        "max-channels",
        10_000,
        "Most of its own channels one connection holds messages of (pushed and not yet "
        "read, or waiting to be pushed); the others' messages wait in storage.",
    ),
    # 4 MiB: thousands of small requests queued for the worker, or one largest frame
    # whole (it is read to its end first); reading pauses, so nothing is refused.
    Option(
        "max-input-bytes",
        4 * 1024 * 1024,
        "Bytes of requests read from one connection and not yet handled before reading pauses.",
    ),
    # 32 MiB: a push pass aims at 4 MiB, so a reader that keeps up never comes near; at
    # least twice --max-message-bytes, so one message can wait while the next is written.
    Option(
        "max-output-bytes",
        32 * 1024 * 1024,
        "Bytes one connection may leave unread before the daemon closes it.",
    ),
    # 512 MiB: a site whose consumers keep up holds a few MB; this leaves room for long
    # backlogs on a small VM. Each message counts its payload plus about 128 bytes.
    Option(
        "max-memory",
        512 * 1024 * 1024,
        "Bytes of waiting messages the memory backend may hold; past it, sends are full.",
    ),
    # 64: a sender's burst on one channel goes out in one write and one round trip per
    # 64 messages, past what a loopback round trip per send allows (docs/flow.md). The
    # room a connection holds counts against its channels' capacity until used or given
    # back (after 200 ms unused, or at close). Not on Redis Cluster (0 there).
    Option(
        "send-window",
        64,
        "Most messages a client may send to one channel ahead of their answers (0: none).",
    ),
    # 2 ms: a client that sends one message at a time (a consumer answering each event)
    # gets a CONFIRM per 2 ms instead of one per send, a frame and a wake-up each; it
    # keeps what is unconfirmed to send again, at most 64 sends (broker/daemon/confirms.py).
    Option(
        "confirm-delay",
        0.002,
        "Seconds the CONFIRM of windowed sends may wait, merged with the next (0: at once).",
        config_field="confirm_delay_s",
    ),
    # 64 windows on 256 channels: a worker answering many consumers holds room on the
    # channels it sent to within the last fraction of a second; beyond this, sends wait.
    Option(
        "max-send-room",
        64 * 256,
        "Most send room (messages, over all channels) one connection may hold.",
    ),
    # The daemon lowers it to what the open file limit leaves (and says so at start).
    Option("max-connections", 10_000, "Most client connections the daemon holds."),
    # A host of 32 processes, each with a few event loops, opens well under 1,000.
    Option("max-connections-per-peer", 1_000, "Most client connections from one IP address."),
    # A layer says HELLO as soon as it connects (after TLS, which this bounds too).
    Option(
        "hello-timeout",
        10.0,
        "Seconds a new connection has to say HELLO (and finish its TLS handshake).",
        config_field="hello_timeout_s",
    ),
    # memory:// only: the other backends keep their state themselves.
    Option(
        "state-file",
        None,
        "memory:// only: on SIGTERM write the waiting messages and memberships to this"
        " file; read them back at the next start.",
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


def default_of(field_name: str) -> Any:
    """The default of the option that sets ``Config.<field_name>``."""
    for option in SERVE_OPTIONS:
        if option.field_name == field_name:
            return option.default
    raise KeyError(field_name)
