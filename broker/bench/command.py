"""The ``channels-broker bench`` command: its options, the run, the report and the exit code."""

from __future__ import annotations

import json

import click

from .report import build_report, machine, text_report
from .runner import run_target
from .scenarios import SCENARIOS
from .targets import build_targets

__all__ = ["bench"]

DEFAULT_BACKEND = "memory://"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@click.command()
@click.option(
    "--backend",
    "backends",
    multiple=True,
    metavar="URL",
    help=f"Start a daemon on this backend and measure it; repeatable. [default: {DEFAULT_BACKEND}"
    " unless --target is given]",
)
@click.option(
    "--target",
    "addresses",
    multiple=True,
    metavar="URL",
    help="Measure a running daemon (tcp://host:port) instead; repeatable. Its data is flushed.",
)
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=DEFAULT_REDIS_URL,
    show_default=True,
    help="The Redis for the channels_redis column (env REDIS_URL).",
)
@click.option(
    "--scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Multiplier on message and call counts; 0.1 for a quick run.",
)
@click.option(
    "--scenario",
    "scenario_names",
    multiple=True,
    type=click.Choice([s.name for s in SCENARIOS]),
    help="Run only this scenario; repeatable. [default: all]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
def bench(
    backends: tuple[str, ...],
    addresses: tuple[str, ...],
    redis_url: str,
    scale: float,
    scenario_names: tuple[str, ...],
    as_json: bool,
) -> None:
    """Measure channel layers side by side: our daemon per backend, and channels_redis.

    Exits with 1 if a scenario failed or did not verify on one of our targets; the
    references' failures (channels_redis repeats messages among workers) are findings.
    """
    info = machine()
    notes: list[str] = []
    chosen = [s for s in SCENARIOS if not scenario_names or s.name in scenario_names]
    if not backends and not addresses:
        backends = (DEFAULT_BACKEND,)
    targets = build_targets(backends, addresses, redis_url, notes.append)
    results = {t.name: run_target(t, chosen, scale, notes.append) for t in targets}
    report = build_report(info, scale, chosen, targets, results, notes)
    click.echo(json.dumps(report, indent=2) if as_json else text_report(report, targets))
    ours = {t.name for t in targets if t.is_ours}
    if any(error["target"] in ours for error in report["errors"]):
        raise click.exceptions.Exit(1)
