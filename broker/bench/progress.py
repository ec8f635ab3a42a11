"""Progress lines on stderr, so that stdout carries the report alone."""

from __future__ import annotations

import click

__all__ = ["progress"]


def progress(text: str) -> None:
    click.echo(f"bench: {text}", err=True)
