"""Why no daemon answered, as the error a user can act on.

Each host's latest failure becomes a reason and a hint: a refused connection (or a
missing unix socket) means nothing listens there, and the hint is the ``serve`` command
that would; a name that does not resolve points at ``hosts`` and DNS; no answer at all
points at the daemon's state and the network. When every host failed the same way the
error is that way's class (``BrokerConnectionRefused``, ``BrokerNameNotResolved``,
``BrokerTimeout``); mixed failures give a plain ``BrokerUnavailable`` naming each.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from .errors import (
    BrokerConnectionRefused,
    BrokerNameNotResolved,
    BrokerTimeout,
    BrokerUnavailable,
)
from .settings import Host, host_url

__all__ = ["unreachable"]

_CONFIG = "`hosts` in CHANNEL_LAYERS"


def unreachable(
    hosts: tuple[Host, ...],
    failures: Mapping[Host, OSError],
    timeout_s: float,
    waited_s: float = 0.0,
) -> BrokerUnavailable:
    """The error of a connect that reached none of ``hosts``, having waited ``waited_s``."""
    kinds = {_kind(failures.get(host)) for host in hosts}
    kind = kinds.pop() if len(kinds) == 1 else BrokerUnavailable
    reasons = "; ".join(_reason(host, failures.get(host), timeout_s) for host in hosts)
    tried = f" (tried for {waited_s:.1f} s)" if waited_s >= 0.1 else ""
    return kind(f"no broker reachable{tried}: {reasons}")


def _kind(failure: OSError | None) -> type[BrokerUnavailable]:
    if isinstance(failure, ConnectionRefusedError | FileNotFoundError):
        return BrokerConnectionRefused
    if isinstance(failure, socket.gaierror):
        return BrokerNameNotResolved
    if failure is None or isinstance(failure, TimeoutError):
        return BrokerTimeout
    return BrokerUnavailable


def _reason(host: Host, failure: OSError | None, timeout_s: float) -> str:
    where = host_url(host)
    kind = _kind(failure)
    if kind is BrokerConnectionRefused:
        missing = (
            "no socket at" if isinstance(failure, FileNotFoundError) else "connection refused at"
        )
        return (
            f"{missing} {where}, so no daemon listens there: start it"
            f" ({_serve_command(host)}), or correct {_CONFIG}"
        )
    if kind is BrokerNameNotResolved:
        assert failure is not None
        return (
            f"the host name {host[1]!r} of {where} does not resolve ({failure.strerror}):"
            f" correct {_CONFIG}, or this machine's DNS or /etc/hosts"
        )
    if kind is BrokerTimeout:
        return (
            f"no answer from {where} within {timeout_s:g} s: the daemon is stopped or"
            " overloaded, or a firewall drops the connection; check that `channels-broker"
            " serve` runs there and that this machine reaches its port, or raise"
            " connect_timeout in the layer's CONFIG"
        )
    assert failure is not None
    return f"{where}: {failure.strerror or failure}"


def _serve_command(host: Host) -> str:
    scheme, address, port = host
    if scheme == "unix":
        return f"channels-broker serve --unix {address}"
    listen = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    tls = " --tls-cert CERT.pem --tls-key KEY.pem" if scheme == "tls" else ""
    return f"channels-broker serve --listen {listen}{tls}"
