"""The ``channels-broker bench`` command: its options, the run, the report and the exit code."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from .asgiref_floor import SYNC_SCENARIO, asgiref_floor_note
from .layers import Note, Settings, Target
from .loopback import echo_round_trips, echo_server
from .report import build_report, machine, text_report
from .runner import Results, run_target
from .scenarios import SCENARIOS
from .targets import build_targets

__all__ = ["bench"]

DEFAULT_BACKEND = "memory://"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
LOOPS = ("asyncio", "uvloop")
POSITIVE = click.IntRange(min=1)
LOOPBACK_ROUND_TRIPS = 2000


def loopback_note() -> str:
    """The yardstick, measured once: one send awaited for its reply cannot beat it."""
    with echo_server() as (port, _):
        echo = echo_round_trips(port, LOOPBACK_ROUND_TRIPS)
    return (
        f"asyncio loopback echo (another process, one round trip at a time): p50"
        f" {echo.p50_us:,.0f} us, {echo.per_s:,.0f} round trips/s"
    )


def default_loops(note: Note) -> tuple[str, ...]:
    if importlib.util.find_spec("uvloop") is not None:
        return LOOPS
    note("daemon on asyncio's loop only: uvloop is not installed (pip install uvloop)")
    return ("asyncio",)


def sync_rates(results: Results, targets: Sequence[Target]) -> dict[str, float]:
    """Our targets' ``sync`` calls/s, by name, where the scenario measured one."""
    rates = {t.name: results[t.name][SYNC_SCENARIO].values for t in targets if t.is_ours}
    return {name: values[0] for name, values in rates.items() if values}


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
    "--loop",
    "loops",
    multiple=True,
    type=click.Choice(LOOPS),
    help="The daemon's event loop (serve --loop); repeatable: a daemon per backend and loop."
    " [default: both when uvloop is installed]",
)
@click.option(
    "--target",
    "addresses",
    multiple=True,
    metavar="URL",
    help="Measure a running daemon (tcp://host:port) instead; repeatable. Its data is flushed;"
    " start it with --max-capacity 100000 (the bench's channels must never be full).",
)
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=DEFAULT_REDIS_URL,
    show_default=True,
    help="The Redis for the channels_redis column (env REDIS_URL).",
)
@click.option(
    "--nats-url",
    envvar="NATS_URL",
    default=DEFAULT_NATS_URL,
    show_default=True,
    help="The NATS server for the channels-nats column, if channels-nats is installed.",
)
@click.option(
    "--scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Multiplier on message and call counts; 0.1 for a quick run.",
)
@click.option("--room-channels", type=POSITIVE, default=10_000, show_default=True,
              help="Big room: channels in the one group.")  # fmt: skip
@click.option("--room-processes", type=POSITIVE, default=8, show_default=True,
              help="Big room: receiving processes the channels are spread over.")  # fmt: skip
@click.option("--room-sends", type=POSITIVE, default=20, show_default=True,
              help="Big room: group_sends, 50 ms apart.")  # fmt: skip
@click.option(
    "--memory-scale",
    type=click.FloatRange(min=0, min_open=True, max=1),
    default=0.01,
    show_default=True,
    help="Memory scenario: fraction of 1,000,000 channels and 10,000,000 memberships"
    " (1 takes about 11 minutes and 1.2 GiB).",
)
@click.option(
    "--scenario",
    "scenario_names",
    multiple=True,
    type=click.Choice([s.name for s in SCENARIOS]),
    help="Run only this scenario; repeatable. [default: all]",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the report as one JSON document to this file ('-': print it instead).",
)
def bench(
    backends: tuple[str, ...],
    loops: tuple[str, ...],
    addresses: tuple[str, ...],
    redis_url: str,
    nats_url: str,
    scenario_names: tuple[str, ...],
    json_path: Path | None,
    **sizes: Any,
) -> None:
    """Measure channel layers side by side: our daemon per backend and event loop, and
    channels_redis and channels-nats when they are installed and their servers answer.

    Exits with 1 if a scenario failed or did not verify on one of our targets; the
    references' failures (channels_redis repeats messages among workers) are findings.
    """
    info = machine()
    notes: list[str] = []
    settings = Settings(**sizes)  # scale, room_*, memory_scale: click's values by name
    chosen = [s for s in SCENARIOS if not scenario_names or s.name in scenario_names]
    if not backends and not addresses:
        backends = (DEFAULT_BACKEND,)
    loops = loops or default_loops(notes.append)
    notes.append(loopback_note())
    peers = {"redis": redis_url, "nats": nats_url}
    targets = build_targets(backends, loops, addresses, peers, notes.append)
    results = {t.name: run_target(t, chosen, settings, notes.append) for t in targets}
    if any(s.name == SYNC_SCENARIO for s in chosen):
        notes.append(asgiref_floor_note(settings, sync_rates(results, targets)))
    report = build_report(info, settings, chosen, targets, results, notes)
    document = json.dumps(report, indent=2)
    if json_path is not None and str(json_path) == "-":
        click.echo(document)
    else:
        click.echo(text_report(report, targets))
        if json_path is not None:
            json_path.write_text(document + "\n")
    ours = {t.name for t in targets if t.is_ours}
    if any(error["target"] in ours for error in report["errors"]):
        raise click.exceptions.Exit(1)
