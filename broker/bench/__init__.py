"""``channels-broker bench``: channels-broker side by side with other Channels layers."""

from __future__ import annotations

from .command import bench
from .errors import BenchError
from .layers import ChannelLayer, LayerFactory, Target
from .runner import Outcome, run_target
from .scenarios import SCENARIOS, Row, Scenario
from .targets import build_targets

__all__ = [
    "SCENARIOS",
    "BenchError",
    "ChannelLayer",
    "LayerFactory",
    "Outcome",
    "Row",
    "Scenario",
    "Target",
    "bench",
    "build_targets",
    "run_target",
]
