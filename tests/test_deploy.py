"""The deploy kit passes its own tools' checks and matches what the daemon exports.

``systemd-analyze`` (Debian package ``systemd``) and ``promtool`` (``prometheus``)
are installed with apt-get when missing and we are root; where neither works the
tests skip, except under ``CI=true``, where a missing tool is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import click
import pytest

from broker.cli import serve
from tests.broker.http_client import http_get
from tests.conftest import BrokerProcess
from tests.ports import free_ports
from tests.waits import POLL_S, START_TIMEOUT_S

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "systemd" / "channels-broker.service"
ENV_FILE = DEPLOY / "systemd" / "channels-broker.env"
RULES = sorted((DEPLOY / "prometheus").glob("*.rules.yml"))
RULE_TESTS = DEPLOY / "prometheus" / "channels-broker.rules.test.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "channels-broker.json"
RUNBOOK = DEPLOY / "README.md"
#: systemd-analyze security's scale: 0 (locked down) to 10 (exposed); "OK" is below 4.
MAX_EXPOSURE = 2.0
APT_TIMEOUT_S = 900
#: The per-test limit for tests that may install their tool first (apt-get update + install).
INSTALLING = pytest.mark.timeout(2 * APT_TIMEOUT_S + 120)
TOOL_TIMEOUT_S = 120
#: Metric names in PromQL: the families the daemon and its process collector export.
METRIC_NAME = re.compile(r"\b(?:channels_broker|process|python)_[a-z0-9_]+\b")


@cache
def tool(name: str, package: str) -> str:
    """The path of ``name``, installing Debian's ``package`` if needed and possible."""
    found = shutil.which(name)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
        ):
            subprocess.run(command, env=env, capture_output=True, timeout=APT_TIMEOUT_S)
        found = shutil.which(name)
    if found is None:
        reason = f"{name} not found and could not be installed (apt-get install {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's command (verify needs it to exist)."""
    command = Path(sys.executable).with_name("channels-broker")
    assert command.exists(), f"{command} missing: install the project (make test does)"
    text = UNIT.read_text()
    assert "ExecStart=/opt/channels-broker/bin/channels-broker serve\n" in text
    path = tmp_path / UNIT.name
    path.write_text(text.replace("/opt/channels-broker/bin/channels-broker", str(command)))
    return path


def unit_settings() -> dict[str, list[str]]:
    """``Key -> [values]`` of the unit, every section, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# -- systemd ------------------------------------------------------------------------


@INSTALLING
def test_unit_passes_systemd_analyze_verify(unit_copy: Path) -> None:
    result = run(tool("systemd-analyze", "systemd"), "verify", unit_copy)
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are warnings with exit code 0: none may name our unit.
    complaints = [line for line in result.stderr.splitlines() if unit_copy.name in line]
    assert complaints == [], complaints


@INSTALLING
def test_unit_sandbox_exposure_is_low(unit_copy: Path) -> None:
    result = run(tool("systemd-analyze", "systemd"), "security", "--offline=yes", unit_copy)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_is_a_hardened_notify_service() -> None:
    settings = unit_settings()

    def one(key: str) -> str:
        assert key in settings, f"{key}= missing from the unit"
        return settings[key][-1]

    assert one("Type") == "notify" and int(one("WatchdogSec")) > 0
    for key in ("DynamicUser", "ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert one(key) == "yes", key
    assert one("MemoryDenyWriteExecute") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""
    assert "@system-service" in settings["SystemCallFilter"]
    # AF_UNIX: the notify socket (and --unix); AF_INET*: clients and backends.
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert int(one("LimitNOFILE")) >= 65536
    shutdown_timeout_s = serve_option("shutdown_timeout").default
    assert isinstance(shutdown_timeout_s, float)
    assert int(one("TimeoutStopSec")) > shutdown_timeout_s


def serve_option(name: str) -> click.Option:
    (option,) = [p for p in serve.params if isinstance(p, click.Option) and p.name == name]
    return option


def env_file_values() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_FILE.read_text().splitlines())
    return {key: value for key, value, *_ in (p for p in pairs if len(p) == 2) if key[0] != "#"}


def test_env_file_names_only_serve_options() -> None:
    """Every variable in the example, set or commented out, is one ``serve`` reads."""
    known = {p.envvar for p in serve.params if isinstance(p, click.Option)}
    named = set(re.findall(r"^#?(CHANNELS_BROKER_[A-Z_]+)=", ENV_FILE.read_text(), re.M))
    assert named and named <= known, named - known


@pytest.fixture
def env_daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A daemon configured by the example environment file alone (ports made free, and
    the state file in a directory of the test's: the unit's StateDirectory= is systemd's)."""
    values = env_file_values()
    port, metrics_port = free_ports(2)
    values["CHANNELS_BROKER_LISTEN"] = f"127.0.0.1:{port}"
    values["CHANNELS_BROKER_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
    assert values["CHANNELS_BROKER_STATE_FILE"].startswith("/var/lib/channels-broker/")
    values["CHANNELS_BROKER_STATE_FILE"] = str(tmp_path / "memory.state")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHANNELS_BROKER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve"],
        env=env | values,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    yield process, metrics_port
    if process.poll() is None:
        process.kill()
    process.wait()
    assert process.stderr is not None
    process.stderr.close()


def test_env_file_configures_a_working_daemon(
    env_daemon: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    process, metrics_port = env_daemon
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if http_get(metrics_port, "/readyz")[0] == 200:
                break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "daemon not ready"
        time.sleep(POLL_S)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert (tmp_path / "memory.state").exists()  # SIGTERM wrote the store, empty as it is


# -- Prometheus -----------------------------------------------------------------------


@INSTALLING
def test_alert_rules_pass_promtool_check() -> None:
    assert RULES, "no deploy/prometheus/*.rules.yml"
    result = run(tool("promtool", "prometheus"), "check", "rules", *RULES)
    assert result.returncode == 0, result.stdout + result.stderr


@INSTALLING
def test_alert_rules_fire_as_their_unit_tests_say() -> None:
    result = run(tool("promtool", "prometheus"), "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


@INSTALLING
def test_scrape_config_passes_promtool_check() -> None:
    result = run(tool("promtool", "prometheus"), "check", "config", SCRAPE_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def alert_blocks() -> dict[str, str]:
    text = "\n".join(path.read_text() for path in RULES)
    blocks = re.split(r"^\s*- alert: ", text, flags=re.M)[1:]
    return {block.split("\n", 1)[0].strip(): block for block in blocks}


def test_every_alert_has_a_summary_and_a_runbook() -> None:
    runbook = RUNBOOK.read_text()
    alerts = alert_blocks()
    expected = {
        "ChannelsBrokerDown",
        "ChannelsBrokerNotReady",
        "ChannelsBrokerBackendErrors",
        "ChannelsBrokerMessagesExpiring",
        "ChannelsBrokerMessagesRejected",
        "ChannelsBrokerLatencyHigh",
        "ChannelsBrokerConnectionsNearFileLimit",
    }
    assert expected <= set(alerts), expected - set(alerts)
    for name, block in alerts.items():
        assert "summary:" in block and "description:" in block, name
        assert f'runbook_url: "deploy/README.md#{name.lower()}"' in block, name
        section = runbook.split(f"\n### {name}\n", 1)
        assert len(section) == 2, f"no '### {name}' runbook in deploy/README.md"
        assert len(section[1].split("\n### ", 1)[0].split()) >= 30, f"{name}: runbook too short"


# -- Grafana --------------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"job", "instance"} <= variables


def _datasource_references(node: object) -> list[object]:
    """Every ``"datasource"`` value anywhere in ``node`` (a JSON document)."""
    found: list[object] = []
    if isinstance(node, dict):
        found += [value for key, value in node.items() if key == "datasource"]
        for value in node.values():
            found += _datasource_references(value)
    elif isinstance(node, list):
        for value in node:
            found += _datasource_references(value)
    return found


def test_dashboard_import_asks_one_data_source_question_that_every_panel_uses() -> None:
    """Grafana's import asks one question per ``__inputs`` entry: there is one (the
    Prometheus), and every panel, target and variable queries it; no other data source
    variable or placeholder is left to ask or to ignore the answer."""
    dashboard = json.loads(DASHBOARD.read_text())
    inputs = dashboard["__inputs"]
    assert [(entry["type"], entry["pluginId"]) for entry in inputs] == [
        ("datasource", "prometheus")
    ]
    declared = {"type": "prometheus", "uid": "${" + inputs[0]["name"] + "}"}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == declared, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == declared, (panel["title"], target)
    variables = dashboard["templating"]["list"]
    assert all(v["type"] != "datasource" for v in variables), "a second question"
    for variable in variables:
        if variable["type"] == "query":
            assert variable["datasource"] == declared, variable["name"]
    body = {key: value for key, value in dashboard.items() if not key.startswith("__")}
    assert all(ref == declared for ref in _datasource_references(body))
    placeholders = set(re.findall(r"\$\{(\w+)", json.dumps(body)))
    assert placeholders <= {inputs[0]["name"]} | {v["name"] for v in variables}, placeholders


#: Sample names of each metric type, from the name in its ``# TYPE`` line (a
#: counter's already ends in _total there).
SUFFIXES = {"counter": ("",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


@pytest.fixture(scope="module")
def exported_names() -> Iterator[set[str]]:
    """Sample names a memory:// daemon exports at /metrics, or would once it has samples.

    Families without samples (storage call timing is for shared backends only) still
    have their ``# TYPE`` line, which gives their sample names.
    """
    daemon = BrokerProcess("memory://")
    daemon.start()
    try:
        text = http_get(daemon.metrics_port, "/metrics")[1].decode()
    finally:
        daemon.cleanup()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names |= {family + suffix for suffix in SUFFIXES.get(kind, ())}
    yield names


def test_rules_and_dashboard_use_only_exported_metrics(exported_names: set[str]) -> None:
    """A renamed metric must not leave an alert or a panel silently empty."""
    used = set(METRIC_NAME.findall("\n".join(path.read_text() for path in RULES)))
    used |= set(METRIC_NAME.findall("\n".join(dashboard_exprs())))
    assert used, "no metric names found"
    assert used <= exported_names, sorted(used - exported_names)
    wanted = {name for name in exported_names if name.startswith("channels_broker_")}
    shown = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    unused = {re.sub(r"_(bucket|count|sum)$", "", n) for n in wanted} - shown
    assert unused <= {"channels_broker_build_info"}, f"not on the dashboard: {sorted(unused)}"
