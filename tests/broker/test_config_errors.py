"""A bad option value is refused naming the value, what is wrong with it, and where it
came from: the flag, the environment variable, or the TOML file and its key.

The usage errors run ``serve`` in this process (click refuses before anything starts);
the listen errors start a daemon, which finds an address it cannot bind, and exits 2.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import main
from broker.config import SERVE_OPTIONS
from tests.ports import free_port
from tests.waits import START_TIMEOUT_S


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CHANNELS_BROKER_* variable of the shell running the tests leaks in."""
    for option in SERVE_OPTIONS:
        monkeypatch.delenv(option.envvar, raising=False)
    monkeypatch.delenv("CHANNELS_BROKER_CONFIG", raising=False)


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """What ``serve *args`` says as it refuses to start (exit 2, no traceback)."""
    result = CliRunner().invoke(main, ["serve", *args], env=env)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_a_comma_in_listen_names_the_address_and_the_flag() -> None:
    output = refused("--listen", "127.0.0.1,127.0.0.2:17733")
    assert "'127.0.0.1,127.0.0.2' is not an IP address or a host name" in output
    assert "repeat the flag" in output and "(from --listen)" in output
    assert "reachable from other hosts" not in output


def test_a_bad_toml_value_is_blamed_on_the_file_and_its_key(tmp_path: Path) -> None:
    """``listen = 17733`` (a port alone, not a string) and a capacity that is not a
    number: each names the file and key, and no environment variable."""
    path = tmp_path / "broker.toml"
    path.write_text("listen = 17733\n")
    output = refused("--config", str(path))
    assert "'17733' is not host:port: give its address too, as 127.0.0.1:17733" in output
    assert f"(from {path}, key listen)" in output
    assert "CHANNELS_BROKER_LISTEN" not in output
    path.write_text('[serve]\nmax-capacity = "many"\n')
    output = refused("--config", str(path))
    assert f"'--max-capacity' (from {path}, key serve.max-capacity)" in output
    assert "'many' is not a valid integer" in output
    assert "env var" not in output


@pytest.mark.parametrize(
    ("env", "said"),
    [
        (
            {"CHANNELS_BROKER_MAX_CAPACITY": "0"},
            "--max-capacity must be positive, not 0"
            " (from environment variable CHANNELS_BROKER_MAX_CAPACITY)",
        ),
        (
            {"CHANNELS_BROKER_METRICS_LISTEN": "nowhere"},
            "'nowhere' is not host:port (from environment variable CHANNELS_BROKER_METRICS_LISTEN)",
        ),
        (
            {"CHANNELS_BROKER_LISTEN": "127.0.0.1:1,127.0.0.1:2"},
            "separate them with spaces in CHANNELS_BROKER_LISTEN",
        ),
    ],
    ids=["capacity", "metrics-listen", "listen"],
)
def test_a_bad_environment_value_names_its_variable(env: dict[str, str], said: str) -> None:
    assert said in refused(env=env)


def test_an_unreadable_token_file_names_its_flag(tmp_path: Path) -> None:
    output = refused("--token-file", str(tmp_path / "missing"))
    assert "cannot read the token file" in output and "(from --token-file)" in output


def serve_refused(*args: str, env: dict[str, str]) -> str:
    """stderr of a ``serve`` process that cannot open a listener (exit 2)."""
    process = subprocess.run(
        [sys.executable, "-m", "broker", "serve", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    return process.stderr


def test_an_address_in_use_names_the_address_why_and_its_source(tmp_path: Path) -> None:
    """A port another socket holds, given by the environment, then as the metrics
    address in the TOML file: each time the address, the reason and the source."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        stderr = serve_refused("--metrics-listen", "off", env={"CHANNELS_BROKER_LISTEN": taken})
        assert f"cannot listen on {taken}: Address already in use" in stderr
        assert "(from environment variable CHANNELS_BROKER_LISTEN)" in stderr
        path = tmp_path / "broker.toml"
        path.write_text(f'metrics-listen = "{taken}"\n')
        listen = f"127.0.0.1:{free_port()}"
        stderr = serve_refused("--listen", listen, "--config", str(path), env={})
        assert f"cannot listen on {taken}: Address already in use" in stderr
        assert f"(from {path}, key metrics-listen)" in stderr
