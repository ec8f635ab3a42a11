"""Running the scenarios on a target, one after another, each timed and on a clean slate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import Unverified, describe
from .layers import LayerFactory, Note, Target, flush
from .progress import progress
from .scenarios import Scenario

__all__ = ["Outcome", "Results", "run_scenario", "run_target"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """A scenario's values (if it measured any) and why it failed (if it did)."""

    values: list[float] | None = None
    error: str | None = None


#: Per target, per scenario name.
Results = dict[str, dict[str, Outcome]]


def run_scenario(scenario: Scenario, factory: LayerFactory, scale: float) -> Outcome:
    """Run one scenario on a clean slate; never raises, so one failure hides no other."""
    started = time.perf_counter()
    try:
        asyncio.run(flush(factory))
        outcome = Outcome(values=scenario.run(factory, scale))
    except Unverified as exc:
        outcome = Outcome(values=exc.values, error=describe(exc))
    except Exception as exc:  # whatever the layer raised is the result to report
        outcome = Outcome(error=describe(exc))
    status = "ok" if outcome.error is None else f"FAILED {outcome.error}"
    progress(f"  {scenario.name}: {time.perf_counter() - started:.1f} s, {status}")
    return outcome


def run_target(
    target: Target, scenarios: Sequence[Scenario], scale: float, note: Note
) -> dict[str, Outcome]:
    """Run ``scenarios`` one after another on ``target``; a failure to open fails them all."""
    progress(target.name)
    try:
        with target.open(note) as factory:
            results = {s.name: run_scenario(s, factory, scale) for s in scenarios}
            asyncio.run(flush(factory))
    except Exception as exc:  # the daemon did not start, or the layer cannot be imported
        progress(f"  FAILED {describe(exc)}")
        return {s.name: Outcome(error=describe(exc)) for s in scenarios}
    return results
