"""``channels-broker status``, ``top`` and ``check``: a running daemon seen from a shell.

All three read the daemon's HTTP listener (``--metrics-listen``, the same option and
``CHANNELS_BROKER_METRICS_LISTEN`` variable as ``serve``): ``/status`` for the
screens, ``/readyz`` for ``check``. ``/status`` names channels and clients, so a daemon
with a token asks for it: ``status`` and ``top`` send ``--token`` (or
``CHANNELS_BROKER_TOKEN``, as ``serve`` reads it). Rates are differences between two
readings of the daemon's counters over the daemon's own monotonic clock.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import click

from broker.config import parse_host_port, serve_option
from broker.errors import ConfigError

__all__ = ["EXIT_NOT_READY", "check", "fetch_status", "render", "status", "top"]

#: ``check`` exit code when the daemon answers not ready or does not answer.
EXIT_NOT_READY = 1
#: Seconds to wait for the daemon's HTTP answer: a live daemon answers in milliseconds.
HTTP_TIMEOUT_S = 5.0
#: ANSI: cursor home, clear screen. ``top`` redraws in place on a terminal.
_CLEAR = "\x1b[H\x1b[2J"

_Command = TypeVar("_Command", bound=Callable[..., Any])


class Unreachable(Exception):
    """The daemon's HTTP listener did not answer."""


def _address_option(command: _Command) -> _Command:
    """``serve``'s ``--metrics-listen`` (flag, variable, default), read here as an address."""
    option = serve_option("metrics-listen")
    return click.option(
        option.flag,
        envvar=option.envvar,
        show_envvar=True,
        default=option.default,
        show_default=True,
        help="The daemon's metrics and health address (host:port).",
    )(command)


def _token_option(command: _Command) -> _Command:
    """``serve``'s token (flag and variable), which ``/status`` asks for."""
    option = serve_option("token")
    return click.option(
        option.flag,
        envvar=option.envvar,
        show_envvar=True,
        default=None,
        help="The daemon's token, which /status needs if the daemon has one (a flag shows"
        " in ps: prefer the variable).",
    )(command)


def _base_url(address: str) -> str:
    try:
        host, port = parse_host_port(address)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--metrics-listen") from exc
    if host in ("0.0.0.0", "::"):  # a wildcard listener answers on loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    """Status code and body of a GET (with the token, if any); ``Unreachable`` if
    nothing answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:  # 503 and friends still carry a body
        with exc:
            return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"no answer from {url}: {exc}") from exc


def fetch_status(address: str, token: str | None = None) -> dict[str, Any]:
    """The daemon's ``/status`` document."""
    code, body = _get(_base_url(address) + "/status", token)
    if code in (401, 403):  # the daemon says why: no token, a wrong one, not loopback
        raise Unreachable(f"{address}/status refused: {body.decode(errors='replace').strip()}")
    if code != 200:
        raise Unreachable(f"{address}/status answered HTTP {code}")
    document: dict[str, Any] = json.loads(body)
    return document


# -- rendering ------------------------------------------------------------------


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def rates(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float] | None:
    """Per-second rates of the counters between two documents; None if not comparable."""
    elapsed = after["clock_s"] - before["clock_s"]
    if elapsed <= 0 or before["pid"] != after["pid"]:
        return None  # same reading, or the daemon restarted in between
    old = before["totals"]
    return {key: (value - old.get(key, 0)) / elapsed for key, value in after["totals"].items()}


def _header(doc: dict[str, Any]) -> list[str]:
    ready = doc["ready"]
    state = "READY" if ready.get("ready") else "NOT READY"
    backend_state = "up" if ready.get("backend") else "DOWN"
    return [
        f"channels-broker {doc['version']}  pid {doc['pid']}  up {_duration(doc['uptime_s'])}"
        f"  {state}",
        f"backend      {doc['backend']} ({backend_state})",
        f"listen       {', '.join(doc['listen'])}",
        f"connections  {doc['connections']}",
    ]


def _rate_lines(per_s: dict[str, float] | None, totals: dict[str, int]) -> list[str]:
    keys = ("accepted", "delivered", "rejected", "dropped", "expired", "errors", "backend_errors")
    if per_s is None:
        cells = [f"{key} {totals.get(key, 0):,}" for key in keys if key in totals]
        return ["totals since start", "  " + "   ".join(cells)]
    cells = [f"{key} {per_s[key]:,.1f}" for key in keys if key in per_s]
    return ["rates per second", "  " + "   ".join(cells)]


def _waiting_lines(doc: dict[str, Any]) -> list[str]:
    waiting = doc.get("waiting")
    if waiting is None:
        return ["waiting      (backend statistics unavailable)"]
    return [
        f"waiting      {waiting['messages']:,} messages in {waiting['channels']:,} channels;"
        f" {waiting['groups']:,} groups, {waiting['memberships']:,} memberships"
    ]


def _top_lines(doc: dict[str, Any]) -> list[str]:
    lines = ["", "top channels by backlog"]
    channels = doc.get("top_channels")
    if channels is None:
        lines.append("  (not available with this backend)")
    elif not channels:
        lines.append("  (no messages waiting)")
    else:
        lines.append(f"  {'MESSAGES':>9}  {'NAMESPACE':<12}  CHANNEL")
        for row in channels:
            lines.append(f"  {row['messages']:>9,}  {row['namespace']:<12}  {row['channel']}")
    clients = [row for row in doc.get("top_clients", []) if row["held"] or row["pulls"]]
    if clients:
        lines += ["", "top clients by unacknowledged pushes"]
        lines.append(f"  {'HELD':>7}  {'PULLS':>5}  {'CLIENT':<18}  PEER")
        for row in clients:
            client = row["client_id"] or "-"
            lines.append(f"  {row['held']:>7,}  {row['pulls']:>5}  {client:<18}  {row['peer']}")
    return lines


def render(doc: dict[str, Any], per_s: dict[str, float] | None = None) -> str:
    """The one-screen view of a ``/status`` document (and rates, if known)."""
    lines = _header(doc) + _waiting_lines(doc) + [""]
    lines += _rate_lines(per_s, doc["totals"]) + _top_lines(doc)
    return "\n".join(lines)


# -- commands -------------------------------------------------------------------


def _fetch_or_exit(address: str, token: str | None) -> dict[str, Any]:
    try:
        return fetch_status(address, token)
    except Unreachable as exc:
        click.echo(f"channels-broker: {exc}", err=True)
        sys.exit(EXIT_NOT_READY)


@click.command()
@_address_option
@_token_option
@click.option("--interval", default=1.0, show_default=True, help="Seconds to measure rates over.")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's /status document.")
def status(metrics_listen: str, token: str | None, interval: float, as_json: bool) -> None:
    """Show how a running daemon is doing, on one screen."""
    first = _fetch_or_exit(metrics_listen, token)
    if as_json:
        click.echo(json.dumps(first, indent=2))
        return
    time.sleep(max(0.0, interval))
    second = _fetch_or_exit(metrics_listen, token)
    click.echo(render(second, rates(first, second)))


@click.command()
@_address_option
@_token_option
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--count", default=0, help="Stop after this many screens (0: until Ctrl-C).")
def top(metrics_listen: str, token: str | None, interval: float, count: int) -> None:
    """Show a running daemon's status, refreshed in place until Ctrl-C."""
    is_terminal = sys.stdout.isatty()
    previous: dict[str, Any] | None = None
    shown = 0
    try:
        while not count or shown < count:
            doc = _fetch_or_exit(metrics_listen, token)
            screen = render(doc, None if previous is None else rates(previous, doc))
            stamp = time.strftime("%H:%M:%S")
            click.echo((_CLEAR if is_terminal else "") + f"{stamp}  {screen}\n")
            previous, shown = doc, shown + 1
            if not count or shown < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves top


@click.command()
@_address_option
@click.option("--quiet", "-q", is_flag=True, help="Print nothing; the exit code says it.")
def check(metrics_listen: str, quiet: bool) -> None:
    """Exit 0 if the daemon is ready (listening, backend reachable), else 1."""
    try:
        code, body = _get(_base_url(metrics_listen) + "/readyz")
    except Unreachable as exc:
        if not quiet:
            click.echo(f"not ready: {exc}", err=True)
        sys.exit(EXIT_NOT_READY)
    if not quiet:
        click.echo(("ready: " if code == 200 else "not ready: ") + body.decode().strip())
    if code != 200:
        sys.exit(EXIT_NOT_READY)
