"""Running the scenarios on a target, one after another, each timed and on a clean slate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import NotApplicable, Unverified, describe
from .layers import Note, Opened, Settings, Target, flush
from .progress import progress
from .scenarios import Scenario

__all__ = ["Outcome", "Results", "run_scenario", "run_target"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """A scenario's values (if it measured any), why it failed (if it did), or why it
    does not apply to the target (``skipped``)."""

    values: list[float] | None = None
    error: str | None = None
    skipped: str | None = None


#: Per target, per scenario name.
Results = dict[str, dict[str, Outcome]]


def run_scenario(scenario: Scenario, opened: Opened, settings: Settings) -> Outcome:
    """Run one scenario on a clean slate; never raises, so one failure hides no other."""
    started = time.perf_counter()
    try:
        asyncio.run(flush(opened.factory))
        outcome = Outcome(values=scenario.run(opened, settings))
    except NotApplicable as exc:
        outcome = Outcome(skipped=str(exc))
    except Unverified as exc:
        outcome = Outcome(values=exc.values, error=describe(exc))
    except Exception as exc:  # whatever the layer raised is the result to report
        outcome = Outcome(error=describe(exc))
    status = "ok" if outcome.error is None else f"FAILED {outcome.error}"
    status = status if outcome.skipped is None else f"skipped: {outcome.skipped}"
    progress(f"  {scenario.name}: {time.perf_counter() - started:.1f} s, {status}")
    return outcome


def run_target(
    target: Target, scenarios: Sequence[Scenario], settings: Settings, note: Note
) -> dict[str, Outcome]:
    """Run ``scenarios`` one after another on ``target``; a failure to open fails them all."""
    progress(target.name)
    try:
        with target.open(note) as opened:
            results = {s.name: run_scenario(s, opened, settings) for s in scenarios}
            asyncio.run(flush(opened.factory))
    except Exception as exc:  # the daemon did not start, or the layer cannot be imported
        progress(f"  FAILED {describe(exc)}")
        return {s.name: Outcome(error=describe(exc)) for s in scenarios}
    return results
