"""The ``channels-broker`` command: thin click commands over ``Config`` and ``Server``.

Every ``serve`` option is a row of ``config.SERVE_OPTIONS``, declared to click from it; each
also reads ``CHANNELS_BROKER_<OPTION>`` from the environment and a key of the TOML file given
by ``--config``; click's own lookup order makes that flag > environment > file > default.
Exit codes live here only.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from click.core import ParameterSource

from backends import BackendError, redacted_url

from .bench import bench
from .config import ENV_PREFIX, POSTGRES_SCHEMES, SERVE_OPTIONS, Config, Option
from .daemon.loops import loop_name, run_on_loop
from .daemon.server import Server
from .errors import ConfigError, ListenError
from .ops.logs import configure_logging
from .ops.malloc import pin_mmap_threshold
from .ops.status import check, status, top
from .version import __version__

__all__ = ["main"]

log = logging.getLogger("channels_broker.cli")

_Command = TypeVar("_Command", bound=Callable[..., Any])

#: Exit codes: 0 clean stop, 2 bad usage or configuration (click's own), 3 backend down.
EXIT_CONFIG = 2
EXIT_BACKEND = 3
#: ``ctx.meta`` key of the TOML file read: its path, and each option's key as written.
_FILE_META = "channels_broker.config_file"


def _load_config_file(ctx: click.Context, _param: click.Parameter, path: str | None) -> None:
    if not path:
        return
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}") from exc
    section, where = (table["serve"], "serve.") if "serve" in table else (table, "")
    values = {key.replace("-", "_"): value for key, value in section.items()}
    ctx.meta[_FILE_META] = (path, {key.replace("-", "_"): where + key for key in section})
    options = {param.name: param for param in ctx.command.params if param.expose_value}
    unknown = sorted(set(values) - set(options))
    if unknown:
        known = ", ".join(sorted(name.replace("_", "-") for name in options))
        raise click.BadParameter(f"{path}: unknown keys {', '.join(unknown)} (known: {known})")
    for name, value in values.items():
        if getattr(options[name], "multiple", False) and not isinstance(value, list):
            values[name] = [value]  # listen = "host:port" means a list of one
    ctx.default_map = values


def _origin(ctx: click.Context, name: str) -> str:
    """Where the value of the option ``name`` (``metrics-listen``) came from: its flag, its
    environment variable, the TOML file's key, or the default."""
    key = name.replace("-", "_")
    source = ctx.get_parameter_source(key)
    if source is ParameterSource.ENVIRONMENT:
        return f"environment variable {ENV_PREFIX}{key.upper()}"
    if source is ParameterSource.DEFAULT_MAP and _FILE_META in ctx.meta:
        path, keys = ctx.meta[_FILE_META]
        return f"{path}, key {keys.get(key, key)}"
    if source is ParameterSource.COMMANDLINE:
        return f"--{name}"
    return f"the default of --{name}"


def _blamed(ctx: click.Context, error: ConfigError | ListenError) -> str:
    """The error's message, with where its option's value came from (if one is at fault)."""
    if error.option is None:
        return str(error)
    return f"{error} (from {_origin(ctx, error.option)})"


class _SourcedOption(click.Option):
    """An option whose conversion errors name where the value came from (click names the
    environment variable whatever the source, so a bad TOML value blamed the variable)."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = click.Parameter.get_error_hint(self, ctx)
        if ctx is None or self.name is None:
            return hint
        if ctx.get_parameter_source(self.name) is ParameterSource.COMMANDLINE:
            return hint
        return f"{hint} (from {_origin(ctx, self.name)})"


def _option(*names: str, **kwargs: Any) -> Callable[[_Command], _Command]:
    """An option whose environment variable is CHANNELS_BROKER_<NAME>."""
    env = ENV_PREFIX + names[0].lstrip("-").replace("-", "_").upper()
    return click.option(
        *names, cls=_SourcedOption, envvar=env, show_envvar=True, show_default=True, **kwargs
    )


def _click_option(option: Option) -> Callable[[_Command], _Command]:
    """The click declaration of one row of ``SERVE_OPTIONS`` (its type from its default)."""
    choice = click.Choice(option.choices, case_sensitive=not option.ignores_case)
    return _option(
        option.flag,
        type=choice if option.choices else None,
        default=option.default,
        multiple=option.is_repeatable,
        is_flag=option.is_flag,
        help=option.help,
    )


def _serve_options(command: _Command) -> _Command:
    """``--config``, then every row of ``SERVE_OPTIONS`` in the table's order."""
    for option in reversed(SERVE_OPTIONS):  # click lists the last decorator applied first
        command = _click_option(option)(command)
    return _option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config_file,
        help="TOML file of option values (keys as option names, top level or [serve]).",
    )(command)


@click.group()
@click.version_option(__version__, prog_name="channels-broker")
def main() -> None:
    """channels-broker: a channel-layer broker daemon for Django Channels."""


@main.command()
@_serve_options
def serve(**values: Any) -> None:
    """Run the broker daemon in the foreground."""
    ctx = click.get_current_context()
    try:
        config = Config.from_options(values)
        config.ssl_context()  # fail now, with a usage error, if the files are unreadable
        loop = loop_name(config.loop, has_tls=bool(config.tls_cert))
    except ConfigError as exc:
        raise click.UsageError(_blamed(ctx, exc)) from exc
    configure_logging(config.log_level_number, config.log_format)
    pin_mmap_threshold()  # so memory a burst of large frames took goes back (ops/malloc.py)
    log.info("event loop: %s", loop)
    try:
        run_on_loop(loop, _serve(config))
    except ConfigError as exc:  # the token file, read as the server is made
        raise click.UsageError(_blamed(ctx, exc)) from exc
    except BackendError as exc:
        log.error("backend failed: %s (its URL from %s)", exc, _origin(ctx, "backend"))
        sys.exit(EXIT_BACKEND)
    except ListenError as exc:
        log.error("%s", _blamed(ctx, exc))
        sys.exit(EXIT_CONFIG)
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
    if urlsplit(backend).scheme not in POSTGRES_SCHEMES:
        shown = redacted_url(backend)
        raise click.UsageError(f"only postgresql:// backends have a schema to migrate: {shown}")
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


# The benchmark imports Channels and the layers it compares only when it runs.
main.add_command(bench)
for _command in (status, top, check):  # a running daemon seen from a shell (status.py)
    main.add_command(_command)
