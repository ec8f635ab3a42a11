"""Imports go one way (protocol <- backends <- broker; inside broker: ops <- daemon <- cli, the
layer alone), no module imports itself back through others, and only the layer and the bench
know Channels."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "backends", "broker")
STDLIB = frozenset(sys.stdlib_module_names)
#: protocol is sans-IO: no event loop, sockets, threads or clock, even from the stdlib.
IO_MODULES = frozenset(
    {"asyncio", "socket", "ssl", "selectors", "threading", "multiprocessing", "concurrent", "time"}
)
#: Which of our packages each part may import (its own included), longest prefix first wins.
#: The layer runs in every Django process: it sees the protocol and nothing else of ours.
#: ops is a library the daemon composes; it never reaches back into the daemon.
_SHARED = ("protocol", "broker.config", "broker.options", "broker.errors", "broker.version")
OURS_ALLOWED: dict[str, tuple[str, ...]] = {
    "protocol": ("protocol",),
    "backends": ("protocol", "backends"),
    "broker.layer": ("protocol", "broker.layer"),
    "broker.ops": (*_SHARED, "backends", "broker.ops"),
    "broker.daemon": (*_SHARED, "backends", "broker.ops", "broker.daemon"),
    "broker.bench": (*_SHARED, "broker.layer", "broker.bench"),
    "broker.config": ("protocol", "broker.errors", "broker.options"),
    "broker.options": ("protocol",),
    "broker.errors": (),
    "broker.version": (),
    "broker.cli": (*_SHARED, "backends", "broker.ops", "broker.daemon", "broker.bench"),
    "broker.__main__": ("broker.cli",),
    "broker": ("broker.errors", "broker.version"),
}
#: Third-party packages only some parts may import (anything not listed is free to all).
THIRD_PARTY_ALLOWED: dict[str, tuple[str, ...]] = {
    "django": ("broker.layer", "broker.bench"),
    "channels": ("broker.layer", "broker.bench"),
    "asgiref": ("broker.layer", "broker.bench"),
    "channels_redis": ("broker.bench",),
    "channels_postgres": ("broker.bench",),
    "psycopg": ("broker.bench",),
    "psycopg_pool": ("broker.bench",),
    "prometheus_client": ("broker.ops",),
    "redis": ("backends.redis", "broker.bench"),
    "asyncpg": ("backends.postgres",),
    "re2": ("broker.daemon",),
    "cryptography": ("broker.layer",),
}


def module_name(path: str) -> str:
    """``broker/layer/client.py`` -> ``broker.layer.client``; a package is its ``__init__``."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


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


def _part(module: str, table: dict[str, tuple[str, ...]]) -> str | None:
    """The longest key of ``table`` that is ``module`` or a package holding it."""
    keys = [key for key in table if module == key or module.startswith(key + ".")]
    return max(keys, key=len) if keys else None


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _refusal(path: str, name: str) -> str | None:
    """Why module ``path`` may not import the module ``name``, or None."""
    module, top = module_name(path), name.split(".")[0]
    part = _part(module, OURS_ALLOWED)
    if top in PACKAGES:
        allowed = OURS_ALLOWED[part] if part is not None else ()
        return None if _within(name, allowed) else f"{part} imports only {', '.join(allowed)}"
    if module.split(".")[0] == "protocol":
        if top not in STDLIB | {"msgpack"}:
            return "protocol imports only the standard library and msgpack"
        if top in IO_MODULES:
            return "protocol is sans-IO"
    owners = THIRD_PARTY_ALLOWED.get(top)
    if owners is not None and not _within(module, owners):
        return f"only {', '.join(owners)} import {top}"
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


def _sources() -> Iterator[tuple[str, str]]:
    for file in _modules():
        yield file.relative_to(ROOT).as_posix(), file.read_text(encoding="utf-8")


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (a name imported from a package that is a
    submodule counts as that submodule; any other, as the package itself)."""
    modules = {module_name(path) for path in sources}
    graph: dict[str, set[str]] = {}
    for path, source in sources.items():
        edges = graph.setdefault(module_name(path), set())
        tree = ast.parse(source, filename=path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom | ast.Import):
                continue
            for name in imported_modules(path, ast.unparse(node)):
                submodules = []
                if isinstance(node, ast.ImportFrom):
                    submodules = [f"{name}.{alias.name}" for alias in node.names]
                found = {target for target in submodules if target in modules}
                edges |= found or ({name} & modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            group.append(node)
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_the_wrong_way() -> None:
    found = []
    for path, source in _sources():
        found += violations(path, source)

    assert found == []


def test_every_module_belongs_to_a_part() -> None:
    unplaced = [path for path, _ in _sources() if _part(module_name(path), OURS_ALLOWED) is None]

    assert unplaced == []
    assert (ROOT / "protocol" / "codec.py") in _modules()


def test_no_import_cycles() -> None:
    assert cycles(import_graph(dict(_sources()))) == []


def test_cycle_finder_finds_a_cycle_through_a_type_checking_import() -> None:
    sources = {
        "broker/layer/a.py": "from .b import B",
        "broker/layer/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from .a import A",
        "broker/layer/c.py": "from . import a",
    }

    assert cycles(import_graph(sources)) == [["broker.layer.a", "broker.layer.b"]]


def test_importing_the_layer_loads_no_daemon_ops_bench_backend_prometheus_or_crypto() -> None:
    code = (
        "import sys, broker.layer\n"
        "heavy = ('broker.daemon', 'broker.ops', 'broker.bench', 'broker.cli', 'backends',"
        " 'prometheus_client', 'redis', 'asyncpg', 'click', 'cryptography')\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(heavy))))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )

    assert loaded.stdout.split() == []
    assert (
        "broker.layer.client"
        in subprocess.run(
            [sys.executable, "-c", "import sys, broker.layer; print(*sys.modules)"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    )


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("protocol/codec.py", "import asyncio"),
        ("protocol/codec.py", "from time import monotonic"),
        ("protocol/codec.py", "import redis"),
        ("protocol/codec.py", "from backends import Backend"),
        ("protocol/codec.py", "from ..broker import server"),
        ("protocol/codec.py", "def f():\n    import broker.daemon.server\n"),
        ("backends/memory/backend.py", "from broker.daemon.routing import Router"),
        ("backends/memory/backend.py", "from ...broker import config"),
        ("backends/redis/backend.py", "import channels.layers"),
        ("backends/redis/backend.py", "import asyncpg"),
        ("broker/daemon/server.py", "from django.conf import settings"),
        ("broker/daemon/server.py", "from channels.exceptions import ChannelFull"),
        ("broker/daemon/server.py", "import channels_redis.core"),
        ("broker/daemon/server.py", "from broker.layer import BrokerChannelLayer"),
        ("broker/daemon/server.py", "import prometheus_client"),
        ("broker/ops/exporter.py", "from ..daemon.context import Context"),
        ("broker/layer/channel_layer.py", "from backends import backend_from_url"),
        ("broker/layer/channel_layer.py", "from ..daemon.routing import Router"),
        ("broker/layer/channel_layer.py", "from .. import config"),
        ("broker/layer/client.py", "from broker.errors import BrokerError"),
        ("broker/layer/channel_layer.py", "import redis.asyncio"),
        ("broker/layer/channel_layer.py", "import channels_redis"),
        ("broker/config.py", "from .daemon import Server"),
        ("broker/bench/runner.py", "from broker.daemon import Server"),
        ("broker/daemon/server.py", "from cryptography.fernet import Fernet"),
    ],
)
def test_checker_reports_a_wrong_way_import(path: str, source: str) -> None:
    assert len(violations(path, source)) == 1


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("protocol/codec.py", "import struct\nimport msgpack\nfrom .errors import ProtocolError"),
        ("protocol/__init__.py", "from __future__ import annotations\nfrom .codec import x"),
        (
            "backends/memory/backend.py",
            "import asyncio\nfrom protocol import names\nfrom ..base import B",
        ),
        ("backends/redis/backend.py", "import redis.asyncio\nfrom ..base import Backend"),
        ("backends/postgres/pool.py", "import asyncpg"),
        ("broker/daemon/server.py", "from backends import Backend\nfrom .routing import Router"),
        ("broker/daemon/server.py", "from ..ops.exporter import Exporter"),
        ("broker/ops/exporter.py", "from prometheus_client import REGISTRY"),
        ("broker/bench/runner.py", "import channels_redis.core\nfrom broker.layer import L"),
        ("broker/layer/channel_layer.py", "from asgiref.sync import async_to_sync"),
        ("broker/layer/client.py", "from django.conf import settings\nfrom protocol import Hello"),
        ("broker/layer/client.py", "from .parking import IdlePool"),
        ("broker/layer/encryption.py", "from cryptography.fernet import Fernet"),
        ("broker/cli.py", "from .daemon import Server\nfrom .ops.status import status"),
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
