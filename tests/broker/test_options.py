"""``serve``'s options come from one table.

The tests resolve values the way ``channels-broker serve`` does (click parses flags,
environment and TOML file into the table's keys, ``Config.from_options`` makes the
value) without starting a daemon.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest

from broker.cli import serve
from broker.config import SERVE_OPTIONS, Config, serve_option
from broker.errors import ConfigError
from broker.ops.status import check, status, top

#: For each option: (its value in the environment, in a TOML file, and as click passes it).
#: Every one differs from the option's default, so reading the default instead fails.
SAMPLES: dict[str, tuple[str, object, object]] = {
    "listen": (
        "127.0.0.1:7001 127.0.0.1:7002",
        ["127.0.0.1:7001", "127.0.0.1:7002"],
        ("127.0.0.1:7001", "127.0.0.1:7002"),
    ),
    "unix": ("/run/broker.sock", "/run/broker.sock", ("/run/broker.sock",)),
    "backend": ("redis://cache:6379/2", "redis://cache:6379/2", "redis://cache:6379/2"),
    "metrics-listen": ("0.0.0.0:9000", "0.0.0.0:9000", "0.0.0.0:9000"),
    "token": ("s3cret", "s3cret", "s3cret"),
    "log-level": ("DEBUG", "DEBUG", "debug"),  # in any case; click gives the choice's own
    "log-format": ("json", "json", "json"),
    "max-message-bytes": ("2048", 2048, 2048),
    "shutdown-timeout": ("2.5", 2.5, 2.5),
    "tls-cert": ("/etc/broker/cert.pem", "/etc/broker/cert.pem", "/etc/broker/cert.pem"),
    "tls-key": ("/etc/broker/key.pem", "/etc/broker/key.pem", "/etc/broker/key.pem"),
    "no-migrate": ("true", True, True),
}


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CHANNELS_BROKER_* variable of the shell running the tests leaks in."""
    for option in SERVE_OPTIONS:
        monkeypatch.delenv(option.envvar, raising=False)
    monkeypatch.delenv("CHANNELS_BROKER_CONFIG", raising=False)
    return monkeypatch


def resolved(command: click.Command, *args: str) -> dict[str, Any]:
    """The values click passes ``command`` for ``args``, the environment and any --config."""
    with command.make_context(command.name or "", list(args)) as context:
        return dict(context.params)


def test_config_defaults_are_the_table_defaults() -> None:
    """Every Config field a user sets is one option's, with that option's default."""
    declared = {item.name: item.default for item in fields(Config) if item.init}
    assert declared == {option.field_name: option.default for option in SERVE_OPTIONS}


def test_serve_without_arguments_makes_the_default_config(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    params = resolved(serve)
    assert list(params) == [option.key for option in SERVE_OPTIONS]
    assert Config.from_options(params) == Config()


def test_every_option_reads_its_environment_variable(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    for option in SERVE_OPTIONS:
        clean_environment.setenv(option.envvar, SAMPLES[option.name][0])
    params = resolved(serve)
    assert params == {option.key: SAMPLES[option.name][2] for option in SERVE_OPTIONS}


def test_every_option_reads_its_toml_key(
    clean_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lines = [f"{option.name} = {json.dumps(SAMPLES[option.name][1])}" for option in SERVE_OPTIONS]
    path = tmp_path / "broker.toml"
    path.write_text("[serve]\n" + "\n".join(lines) + "\n")
    params = resolved(serve, "--config", str(path))
    assert params == {option.key: SAMPLES[option.name][2] for option in SERVE_OPTIONS}


def test_options_said_as_a_user_says_them_become_config_values() -> None:
    config = Config.from_options({"metrics_listen": "off", "token": "", "log_level": "WARNING"})
    assert config.metrics_listen is None
    assert config.token is None
    assert config.log_level == "warning"
    assert Config.from_options({"metrics_listen": ""}).metrics_listen is None


def test_no_migrate_tells_only_a_postgresql_backend_not_to_migrate() -> None:
    postgres = "postgresql://postgres@db:5432/app?schema=broker"
    config = Config.from_options({"backend": postgres, "no_migrate": True})
    assert config.backend == postgres
    assert config.backend_url == postgres + "&migrate=false"
    assert Config.from_options({"backend": postgres}).backend_url == postgres
    redis_url = "redis://cache:6379/0"
    assert Config.from_options({"backend": redis_url, "no_migrate": True}).backend_url == redis_url


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"log_level": "loud"}, "'loud' is not one of"),
        ({"log_format": "xml"}, "'xml' is not one of text, json"),
        ({"listen": (), "unix": ()}, "nothing to listen on"),
        ({"tls_cert": "cert.pem"}, "needs both"),
    ],
)
def test_bad_option_values_raise_config_error(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_options(values)


@pytest.mark.parametrize("command", [status, top, check], ids=lambda command: command.name)
def test_shell_commands_read_the_metrics_address_as_serve_does(
    command: click.Command, clean_environment: pytest.MonkeyPatch
) -> None:
    option = serve_option("metrics-listen")
    assert resolved(command)["metrics_listen"] == option.default
    clean_environment.setenv(option.envvar, "127.0.0.1:9999")
    assert resolved(command)["metrics_listen"] == "127.0.0.1:9999"
