"""Imports go one way, protocol <- backends <- broker, and only the layer knows Channels."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "backends", "broker")
OURS = frozenset(PACKAGES)
#: The one module that is the Channels layer; it may use Channels and Django.
LAYER = "broker/layer.py"
#: The layer's own parts: they import what the layer may, and one another.
LAYER_PARTS = frozenset({LAYER, "broker/layer_client.py", "broker/layer_parking.py"})
LAYER_MODULES = frozenset(path.removesuffix(".py").replace("/", ".") for path in LAYER_PARTS)
#: The benchmark compares us with channels_redis, so it alone may import that.
BENCH = "broker/bench.py"
#: The benchmark's modules measure other layers too, so they may load those layers'
#: packages (channels_redis; channels_postgres, a Django app, with Django itself).
BENCH_PARTS = frozenset({BENCH, "broker/bench_postgres.py"})
COMPARED = frozenset({"channels_redis", "channels_postgres", "django", "channels"})
FRAMEWORK = frozenset({"django", "channels"})
STDLIB = frozenset(sys.stdlib_module_names)
#: protocol is sans-IO: no event loop, sockets, threads or clock, even from the stdlib.
IO_MODULES = frozenset(
    {"asyncio", "socket", "ssl", "selectors", "threading", "multiprocessing", "concurrent", "time"}
)


def imported_modules(path: str, source: str) -> list[str]:
    """Absolute dotted names imported by the module at ``path`` (relative to the root).

    The source is parsed, not imported, and nested imports (in functions, under
    ``TYPE_CHECKING``) count as much as top-level ones.
    """
    package = path.removesuffix(".py").split("/")[:-1]
    names = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: max(0, len(package) - node.level + 1)] if node.level else []
            if node.module is not None:
                names.append(".".join([*base, node.module]))
            else:
                # `from . import codec`, `from .. import backends`: the names are modules.
                names += [".".join([*base, alias.name]) for alias in node.names]
    return names


def _refusal(path: str, name: str) -> str | None:
    """Why module ``path`` may not import the module ``name``, or None."""
    layer, top = path.split("/")[0], name.split(".")[0]
    if path in LAYER_PARTS:
        allowed = STDLIB | {"msgpack", "protocol", "channels", "asgiref", "django"}
        if top in allowed or name in LAYER_MODULES:
            return None
        return "the layer imports only protocol, Channels, stdlib and its own parts"
    if layer == "protocol" and top not in STDLIB | {"msgpack", "protocol"}:
        return "protocol imports only the standard library and msgpack"
    if layer == "protocol" and top in IO_MODULES:
        return "protocol is sans-IO"
    if layer == "backends" and top == "broker":
        return "backends never import broker"
    if path in BENCH_PARTS and top in COMPARED:
        return None
    if top in FRAMEWORK:
        return f"only {LAYER} imports {top}"
    if top == "channels_redis" and path != BENCH:
        return f"only {BENCH} imports channels_redis"
    return None


def violations(path: str, source: str) -> list[str]:
    """Every wrong-way import of the module at ``path``, as readable lines."""
    found = []
    for name in imported_modules(path, source):
        reason = _refusal(path, name)
        if reason is not None:
            found.append(f"{path} imports {name}: {reason}")
    return found


def _modules() -> list[Path]:
    return sorted(file for package in PACKAGES for file in (ROOT / package).rglob("*.py"))


def test_no_module_imports_the_wrong_way() -> None:
    found = []
    for file in _modules():
        path = file.relative_to(ROOT).as_posix()
        found += violations(path, file.read_text(encoding="utf-8"))

    assert found == []


def test_every_package_is_checked() -> None:
    checked = {file.relative_to(ROOT).parts[0] for file in _modules()}

    assert {"protocol", "backends"} <= checked
    assert (ROOT / "protocol" / "codec.py") in _modules()


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("protocol/codec.py", "import asyncio"),
        ("protocol/codec.py", "from time import monotonic"),
        ("protocol/codec.py", "import redis"),
        ("protocol/codec.py", "from backends import Backend"),
        ("protocol/codec.py", "from ..broker import server"),
        ("protocol/codec.py", "def f():\n    import broker.server\n"),
        ("backends/memory.py", "from broker.routing import Router"),
        ("backends/memory.py", "from ..broker import config"),
        ("backends/redis.py", "import channels.layers"),
        ("broker/server.py", "from django.conf import settings"),
        ("broker/server.py", "from channels.exceptions import ChannelFull"),
        ("broker/server.py", "import channels_redis.core"),
        ("broker/layer.py", "from backends import backend_from_url"),
        ("broker/layer.py", "from .routing import Router"),
        ("broker/layer.py", "from . import config"),
        ("broker/layer.py", "import redis.asyncio"),
        ("broker/layer.py", "import channels_redis"),
    ],
)
def test_checker_reports_a_wrong_way_import(path: str, source: str) -> None:
    assert len(violations(path, source)) == 1


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("protocol/codec.py", "import struct\nimport msgpack\nfrom .errors import ProtocolError"),
        ("protocol/__init__.py", "from __future__ import annotations\nfrom .codec import x"),
        ("backends/memory.py", "import asyncio\nfrom protocol import names\nfrom .base import B"),
        ("backends/redis.py", "import redis.asyncio"),
        ("broker/server.py", "from backends import Backend\nfrom .routing import Router"),
        ("broker/bench.py", "import channels_redis.core\nfrom broker.layer import L"),
        ("broker/layer.py", "from asgiref.sync import async_to_sync\nimport channels.layers"),
        ("broker/layer.py", "from django.conf import settings\nfrom protocol import Hello"),
    ],
)
def test_checker_allows_a_right_way_import(path: str, source: str) -> None:
    assert violations(path, source) == []


def test_relative_imports_resolve_against_their_package() -> None:
    source = "from . import codec\nfrom .errors import E\nfrom .. import backends"

    assert imported_modules("protocol/frames.py", source) == [
        "protocol.codec",
        "protocol.errors",
        "backends",
    ]
    assert imported_modules("protocol/__init__.py", "from .codec import x") == ["protocol.codec"]
