"""``python -m broker`` runs the ``channels-broker`` command."""

from __future__ import annotations

from .cli import main

main()
