"""The report: the machine and command, one row per measured number with the ratios of ours
to each reference, as JSON or as a text table."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from .harness import Row
from .layers import Settings, Target
from .runner import Outcome, Results
from .scenarios import Scenario, sizes

__all__ = ["build_report", "machine", "text_report"]

#: (label, distribution) of the libraries whose versions move the numbers.
VERSIONS_SHOWN = (
    ("channels", "channels"),
    ("channels_redis", "channels-redis"),
    ("channels-nats", "channels-nats"),
    ("uvloop", "uvloop"),
    ("redis-py", "redis"),
)


def ratio_pairs(targets: Sequence[Target]) -> list[tuple[str, str, str]]:
    """(ours, theirs, column label) for each of our targets against each reference."""
    ours = [t.name for t in targets if t.is_ours]
    theirs = [t.name for t in targets if not t.is_ours]
    # With one daemon, "broker/channels_redis" says it all; with several, name each.
    return [(a, b, f"{short(a) if len(ours) > 1 else 'broker'}/{b}") for a in ours for b in theirs]


def short(name: str) -> str:
    """ "memory, uvloop" for "broker (memory, uvloop)": the ratio columns are many."""
    return name.removeprefix("broker (").removesuffix(")")


def ratio(row: Row, ours: float | None, theirs: float | None) -> float | None:
    """Oriented so that above 1 means ours is better: theirs/ours for latencies."""
    if not ours or not theirs:
        return None
    return ours / theirs if row.is_higher_better else theirs / ours


def known(value: float) -> float | None:
    """``value``, or None for one that could not be read (NaN: JSON has no such number)."""
    return None if math.isnan(value) else value


def table_row(
    row: Row, index: int, outcomes: dict[str, Outcome], pairs: Sequence[tuple[str, str, str]]
) -> dict[str, Any]:
    """One row as the JSON output has it; the text table is drawn from these."""
    values = {name: known(o.values[index]) if o.values else None for name, o in outcomes.items()}
    verified = {name: o.error is None for name, o in outcomes.items()}
    # A ratio against a number that failed verification would compare unlike things.
    sound = {name: value if verified[name] else None for name, value in values.items()}
    return {
        "metric": row.label,
        "unit": row.unit,
        "higher_is_better": row.is_higher_better,
        "values": values,
        "verified": verified,
        "skipped": {name: o.skipped for name, o in outcomes.items() if o.skipped},
        "ratios": {label: ratio(row, sound[a], sound[b]) for a, b, label in pairs},
    }


def table_rows(
    scenarios: Sequence[Scenario], targets: Sequence[Target], results: Results
) -> list[dict[str, Any]]:
    pairs = ratio_pairs(targets)
    return [
        {"scenario": scenario.name}
        | table_row(row, index, {t.name: results[t.name][scenario.name] for t in targets}, pairs)
        for scenario in scenarios
        for index, row in enumerate(scenario.rows)
    ]


def failures(results: Results) -> list[dict[str, str]]:
    """Each failed or unverified scenario of each target, as the report's ``errors`` lists it."""
    return [
        {"target": target, "scenario": scenario, "error": outcome.error}
        for target, outcomes in results.items()
        for scenario, outcome in outcomes.items()
        if outcome.error is not None
    ]


def command_line() -> str:
    # ``python -m broker`` leaves the path of __main__.py in argv[0]; show what was typed.
    if sys.argv[0].endswith("__main__.py"):
        return shlex.join([sys.executable, "-m", "broker", *sys.argv[1:]])
    return shlex.join(sys.argv)


def machine() -> dict[str, Any]:
    versions = {}
    for label, distribution in VERSIONS_SHOWN:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[label] = importlib.metadata.version(distribution)
    return {
        "cpus": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        # Other work on the machine skews the numbers; taken before the run, the load
        # average says whether there was any.
        "load_1min": round(os.getloadavg()[0], 2),
        "versions": versions,
    }


def build_report(
    info: dict[str, Any],
    settings: Settings,
    scenarios: Sequence[Scenario],
    targets: Sequence[Target],
    results: Results,
    notes: list[str],
) -> dict[str, Any]:
    """The JSON document; ``info`` is ``machine()``, taken before the run."""
    return {
        "command": command_line(),
        "machine": info,
        "scale": settings.scale,
        "sizes": sizes(settings),
        "targets": [t.name for t in targets],
        "rows": table_rows(scenarios, targets, results),
        "notes": notes,
        "errors": failures(results),
    }


def format_value(value: float | None, is_verified: bool, is_skipped: bool = False) -> str:
    if is_skipped:
        return "n/a"
    if value is None:
        return "error" if not is_verified else "?"
    text = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return text if is_verified else f"{text}!"


def text_table(rows: Sequence[dict[str, Any]], targets: Sequence[Target]) -> list[str]:
    names = [t.name for t in targets]
    pairs = [label for _, _, label in ratio_pairs(targets)]
    header = ["metric", *names, *pairs]
    body = [
        [f"{row['metric']} ({row['unit']})"]
        + [
            format_value(row["values"][name], row["verified"][name], name in row["skipped"])
            for name in names
        ]
        + [("-" if (r := row["ratios"][pair]) is None else f"{r:.2f}x") for pair in pairs]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return [
        "  ".join(
            [line[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        )
        for line in [header, *body]
    ]


def text_report(report: dict[str, Any], targets: Sequence[Target]) -> str:
    info = report["machine"]
    versions = ", ".join(f"{name} {v}" for name, v in info["versions"].items())
    lines = [
        f"command: {report['command']}",
        f"machine: {info['cpus']} CPUs (load {info['load_1min']} before the run), {info['python']},"
        f" {info['platform']}; {versions}",
        "sizes: " + ", ".join(f"{k}={v}" for k, v in report["sizes"].items()),
        f"scale: {report['scale']}; ratio > 1 means broker is better (latency: theirs/ours);"
        " '!' marks a value that failed verification; n/a: does not apply; ?: not readable",
        "",
        *text_table(report["rows"], targets),
        "",
    ]
    lines += [f"note: {text}" for text in report["notes"]]
    lines += [f"error: {e['target']} / {e['scenario']}: {e['error']}" for e in report["errors"]]
    return "\n".join(lines)
