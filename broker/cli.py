"""The ``channels-broker`` command: thin click commands over ``Config`` and ``Server``.

Every ``serve`` option also reads ``CHANNELS_BROKER_<OPTION>`` from the environment
and a key of the TOML file given by ``--config``; click's own lookup order makes
that flag > environment > file > default. Exit codes live here only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click

from backends import BackendError

from .config import DEFAULT_LISTEN, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_METRICS_LISTEN, Config
from .daemon.server import Server
from .errors import ConfigError
from .ops.logs import configure_logging
from .ops.status import check, status, top
from .version import __version__

__all__ = ["main"]

log = logging.getLogger("channels_broker.cli")

_Command = TypeVar("_Command", bound=Callable[..., Any])

#: Exit codes: 0 clean stop, 2 bad usage or configuration (click's own), 3 backend down.
EXIT_CONFIG = 2
EXIT_BACKEND = 3


def _load_config_file(ctx: click.Context, _param: click.Parameter, path: str | None) -> None:
    if not path:
        return
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}") from exc
    section = table.get("serve", table)
    values = {key.replace("-", "_"): value for key, value in section.items()}
    options = {param.name: param for param in ctx.command.params if param.expose_value}
    unknown = sorted(set(values) - set(options))
    if unknown:
        known = ", ".join(sorted(name.replace("_", "-") for name in options))
        raise click.BadParameter(f"{path}: unknown keys {', '.join(unknown)} (known: {known})")
    for name, value in values.items():
        if getattr(options[name], "multiple", False) and isinstance(value, str):
            values[name] = [value]  # listen = "host:port" means a list of one
    ctx.default_map = values


def _option(*names: str, **kwargs: Any) -> Callable[[_Command], _Command]:
    """A serve option whose environment variable is CHANNELS_BROKER_<NAME>."""
    env = "CHANNELS_BROKER_" + names[0].lstrip("-").replace("-", "_").upper()
    return click.option(*names, envvar=env, show_envvar=True, show_default=True, **kwargs)


@click.group()
@click.version_option(__version__, prog_name="channels-broker")
def main() -> None:
    """channels-broker: a channel-layer broker daemon for Django Channels."""


@main.command()
@_option(
    "--config",
    type=click.Path(dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=_load_config_file,
    help="TOML file of option values (keys as option names, top level or [serve]).",
)
@_option("--listen", multiple=True, default=[DEFAULT_LISTEN], help="TCP host:port; repeatable.")
@_option("--unix", multiple=True, help="Unix socket path to listen on; repeatable.")
@_option("--backend", default="memory://", help="memory://, redis://..., postgresql://...")
@_option("--metrics-listen", default=DEFAULT_METRICS_LISTEN, help="host:port, or 'off'.")
@_option("--token", default=None, help="Shared secret clients must present.")
@_option(
    "--log-level",
    default="info",
    type=click.Choice(["critical", "error", "warning", "info", "debug"], case_sensitive=False),
)
@_option("--log-format", default="text", type=click.Choice(["text", "json"]))
@_option("--max-message-bytes", default=DEFAULT_MAX_MESSAGE_BYTES, type=int)
@_option("--shutdown-timeout", default=10.0, type=float, help="Seconds to finish on SIGTERM.")
@_option("--tls-cert", default=None, help="PEM certificate chain: TCP listeners speak TLS.")
@_option("--tls-key", default=None, help="PEM private key for --tls-cert.")
@_option(
    "--no-migrate",
    is_flag=True,
    default=False,
    help="Do not create or upgrade the PostgreSQL schema at start (see 'migrate').",
)
def serve(
    listen: tuple[str, ...],
    unix: tuple[str, ...],
    backend: str,
    metrics_listen: str,
    token: str | None,
    log_level: str,
    log_format: str,
    max_message_bytes: int,
    shutdown_timeout: float,
    tls_cert: str | None,
    tls_key: str | None,
    no_migrate: bool,
) -> None:
    """Run the broker daemon in the foreground."""
    try:
        config = Config(
            listen=tuple(listen),
            unix=tuple(unix),
            backend_url=_without_migration(backend) if no_migrate else backend,
            metrics_listen=None if metrics_listen in ("", "off") else metrics_listen,
            token=token or None,
            log_level=log_level.lower(),
            log_format=log_format,
            max_message_bytes=max_message_bytes,
            shutdown_timeout_s=shutdown_timeout,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
        config.ssl_context()  # fail now, with a usage error, if the files are unreadable
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    configure_logging(config.log_level_number, config.log_format)
    try:
        asyncio.run(_serve(config))
    except BackendError as exc:
        log.error("backend failed: %s", exc)
        sys.exit(EXIT_BACKEND)
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        sys.exit(EXIT_CONFIG)


async def _serve(config: Config) -> None:
    server = Server(config)
    await server.serve()


@main.command()
@_option("--backend", required=True, help="postgresql://... (the schema to create or upgrade).")
def migrate(backend: str) -> None:
    """Create or upgrade the PostgreSQL backend's schema, then exit.

    'serve' does the same at start unless --no-migrate; run this first where the
    daemons' database user may not create tables.
    """
    if urlsplit(backend).scheme not in _POSTGRES_SCHEMES:
        raise click.UsageError(f"only postgresql:// backends have a schema to migrate: {backend}")
    configure_logging(logging.INFO, "text")
    try:
        before, after = asyncio.run(_migrate(backend))
    except BackendError as exc:
        log.error("migration failed: %s", exc)
        sys.exit(EXIT_BACKEND)
    if before == after:
        click.echo(f"schema is up to date (version {after})")
    else:
        click.echo(f"schema migrated from version {before} to {after}")


async def _migrate(url: str) -> tuple[int, int]:
    from backends.postgres.backend import PostgresBackend  # loads asyncpg: only for this command

    backend = PostgresBackend.from_url(url)
    try:
        return await backend.migrate()
    finally:
        await backend.close()


_POSTGRES_SCHEMES = ("postgresql", "postgres")


def _without_migration(url: str) -> str:
    """``url`` telling a PostgreSQL backend not to migrate; other backends have no schema."""
    parts = urlsplit(url)
    if parts.scheme not in _POSTGRES_SCHEMES:
        return url
    return urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, "migrate=false"]))))


def _add_optional_commands() -> None:
    # The benchmark imports Channels lazily; the daemon itself never needs it.
    from .bench.runner import bench

    main.add_command(bench)


with contextlib.suppress(ImportError):  # bench.py not present in this build
    _add_optional_commands()

for _command in (status, top, check):  # a running daemon seen from a shell (status.py)
    main.add_command(_command)
