"""``serve``'s options come from one table; URLs shown to people hide their passwords.

The option tests resolve values the way ``channels-broker serve`` does (click parses
flags, environment and TOML file into the table's keys, ``Config.from_options`` makes the
value) without starting a daemon; the redaction test at the end starts one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest

from backends import BackendError, backend_from_url, redacted_url
from broker.cli import serve
from broker.config import SERVE_OPTIONS, Config, serve_option
from broker.errors import ConfigError
from broker.ops.status import check, status, top
from tests import servers
from tests.broker.http_client import http_get
from tests.conftest import BrokerProcess

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
    "loop": ("asyncio", "asyncio", "asyncio"),
    "max-message-bytes": ("2048", 2048, 2048),
    "shutdown-timeout": ("2.5", 2.5, 2.5),
    "tls-cert": ("/etc/broker/cert.pem", "/etc/broker/cert.pem", "/etc/broker/cert.pem"),
    "tls-key": ("/etc/broker/key.pem", "/etc/broker/key.pem", "/etc/broker/key.pem"),
    "no-migrate": ("true", True, True),
    "token-file": ("/etc/broker/tokens", "/etc/broker/tokens", "/etc/broker/tokens"),
    "allow-unauthenticated": ("true", True, True),
    "tls-client-ca": ("/etc/broker/ca.pem", "/etc/broker/ca.pem", "/etc/broker/ca.pem"),
    "max-capacity": ("500", 500, 500),
    "max-expiry": ("120.5", 120.5, 120.5),
    "max-group-expiry": ("3600", 3600.0, 3600.0),
    "max-patterns": ("7", 7, 7),
    "max-batch": ("512", 512, 512),
    "max-pulls": ("12", 12, 12),
    "max-memberships": ("99", 99, 99),
    "max-channels": ("77", 77, 77),
    "max-input-bytes": ("65536", 65536, 65536),
    "max-output-bytes": ("131072", 131072, 131072),
    "max-memory": ("1048576", 1048576, 1048576),
    "send-window": ("16", 16, 16),
    "confirm-delay": ("0.01", 0.01, 0.01),
    "max-send-room": ("1024", 1024, 1024),
    "max-connections": ("40", 40, 40),
    "max-connections-per-peer": ("4", 4, 4),
    "hello-timeout": ("0.5", 0.5, 0.5),
    "state-file": ("/var/lib/b/state", "/var/lib/b/state", "/var/lib/b/state"),
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
        # Bounds a client's HELLO is checked against must stay representable.
        ({"max_capacity": 2**31}, "--max-capacity must be at most"),
        ({"max_expiry": 1e17}, "--max-expiry must be at most"),
        ({"max_group_expiry": float("inf")}, "--max-group-expiry must be at most"),
        ({"max_expiry": float("nan")}, "--max-expiry must be positive"),
        # The layer's ACKs carry up to MAX_ACK_PAIRS; HELLO's patterns are items too.
        ({"max_batch": 255}, "--max-batch must be at least 256"),
        ({"max_patterns": 1001}, "--max-patterns must not be over --max-batch"),
        # A layer leaves four windows unconfirmed at most, and a daemon remembers that many.
        ({"send_window": -1}, "--send-window must be between 0 and 256"),
        ({"send_window": 257}, "--send-window must be between 0 and 256"),
        ({"confirm_delay": -0.1}, "--confirm-delay must be between 0 and 1 s"),
        ({"confirm_delay": 2.0}, "--confirm-delay must be between 0 and 1 s"),
        ({"max_send_room": 0}, "--max-send-room must be positive"),
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


# -- URLs shown to people -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://user:secret@cache/0", "redis://user:***@cache/0"),
        ("redis://:p@ss:w@cache/0", "redis://:***@cache/0"),
        (
            "redis+sentinel://h1:26379,h2:26379/mymaster?sentinel_password=secret",
            "redis+sentinel://h1:26379,h2:26379/mymaster?sentinel_password=***",
        ),
        (
            "rediss+sentinel://u:secret@h1:26379/m/2?sentinel_username=s&sentinel_password=secret"
            "&prefix=app",
            "rediss+sentinel://u:***@h1:26379/m/2?sentinel_username=s&sentinel_password=***"
            "&prefix=app",
        ),
        (
            "postgresql://postgres@db:5432/app?password=secret&schema=broker",
            "postgresql://postgres@db:5432/app?password=***&schema=broker",
        ),
        ("postgresql://db/app?sslpassword=secret", "postgresql://db/app?sslpassword=***"),
        ("postgresql://db/app?PassWord=secret", "postgresql://db/app?PassWord=***"),
        ("postgresql://db/app?pass%77ord=secret", "postgresql://db/app?pass%77ord=***"),
        ("redis://cache/0?token=secret#frag", "redis://cache/0?token=***#frag"),
    ],
)
def test_redacted_url_hides_passwords_in_userinfo_and_query(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
    assert "secret" not in redacted_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "redis://user@cache:6379/0",
        "redis+unix:///run/redis.sock?db=2",
        "redis+cluster://h1:7000,h2:7001?prefix=app&timeout=2",
        "postgresql://postgres@db:5432/app?schema=broker&password",
        "postgresql://[::1]:5432/app",
        "not a url at all",
    ],
)
def test_redacted_url_leaves_a_url_without_secrets_as_written(url: str) -> None:
    assert redacted_url(url) == url


#: The two secrets the daemon's URL carries: one for the data node, one for Sentinel.
MASTER_SECRET = "master-secret-4f1c"
SENTINEL_SECRET = "sentinel-secret-9d2e"


@pytest.fixture(scope="module")
def guarded_sentinel() -> Iterator[servers.RedisSentinel]:
    """A Sentinel and its master of our own, each asking for its own password."""
    sentinel = servers.RedisSentinel()
    sentinel.start()
    try:
        # Sentinel first learns the master's password, so it never sees it refuse.
        sentinel_url = f"redis://127.0.0.1:{sentinel.port}"
        command = ("SENTINEL", "SET", sentinel.MASTER_NAME, "auth-pass", MASTER_SECRET)
        servers.server_command(sentinel_url, *command)
        command = ("ACL", "SETUSER", "default", "resetpass", f">{SENTINEL_SECRET}")
        servers.server_command(sentinel_url, *command)
        servers.server_command(sentinel.master.url, "CONFIG", "SET", "requirepass", MASTER_SECRET)
        yield sentinel
    finally:
        sentinel.stop()


def test_daemon_log_and_status_hide_the_passwords_of_its_backend_url(
    guarded_sentinel: servers.RedisSentinel,
) -> None:
    """1. A daemon on redis+sentinel://:<secret>@.../mymaster?sentinel_password=<secret>.
    2. Its backend is up, so both secrets were used.
    3. Neither is in its log or its /status; both show the URL with *** in their place."""
    location = f"127.0.0.1:{guarded_sentinel.port}/{guarded_sentinel.MASTER_NAME}"
    daemon = BrokerProcess(
        f"redis+sentinel://:{MASTER_SECRET}@{location}?sentinel_password={SENTINEL_SECRET}"
    )
    shown = f"redis+sentinel://:***@{location}?sentinel_password=***"
    daemon.start()
    try:
        code, body = http_get(daemon.metrics_port, "/status")
        assert daemon.stop() == 0
        log = daemon.stderr_text()
    finally:
        daemon.cleanup()
    assert code == 200
    document = json.loads(body)
    assert document["ready"]["backend"] is True
    assert document["backend"] == shown
    assert f"serving with backend {shown}" in log
    for secret in (MASTER_SECRET, SENTINEL_SECRET):
        assert secret not in log
        assert secret.encode() not in body


def test_every_command_is_listed_and_answers_help() -> None:
    from click.testing import CliRunner

    from broker.cli import main

    for command in ("serve", "migrate", "status", "top", "check", "bench"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.output


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@127.0.0.1:6379/0?bogus=1",
        "redis+sentinel://127.0.0.1:26379/m?sentinel_password=hunter2&bogus=1",
        "postgresql://u:hunter2@[::1/db",
        "carrier-pigeon://u:hunter2@coop",
        "memory://u:hunter2@host",
    ],
)
def test_a_refused_backend_url_is_named_without_its_password(url: str) -> None:
    with pytest.raises(BackendError) as refused:
        backend_from_url(url)

    assert "hunter2" not in str(refused.value)
    assert "***" in str(refused.value)


@pytest.mark.parametrize(
    "option",
    # --max-message-bytes has a range of its own (protocol.limits), tested with the CLI.
    [o for o in SERVE_OPTIONS if o.name.startswith("max-") and o.name != "max-message-bytes"],
)
def test_every_bound_must_be_positive(option: Any) -> None:
    with pytest.raises(ConfigError, match=option.flag):
        Config(**{option.field_name: 0})
