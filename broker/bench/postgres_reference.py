"""channels_postgres as a reference column of ``channels-broker bench``.

channels_postgres is a Django app: it needs settings, ``django.setup()`` and its
migrations before its layer can be made. Here that happens once per bench run, against
the database of the PostgreSQL backend being measured, in a schema of its own
(``channels_postgres_bench``, through ``search_path``), so its tables meet nothing of
ours or the site's. Two things it keeps per process are made per event loop, since the
bench runs each scenario on a fresh loop (as ``async_to_sync`` code does): its
connection pool and the lock guarding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import describe
from .layers import CAPACITY, EXPIRY_S, ChannelLayer, Note, Opened, Target

__all__ = ["channels_postgres_target"]

#: Where channels_postgres keeps its tables during the bench.
BENCH_SCHEMA = "channels_postgres_bench"


def channels_postgres_target(postgres_url: str, note: Note) -> Target | None:
    """A bench ``Target`` for channels_postgres on ``postgres_url``'s database, or None."""
    missing = [m for m in ("channels_postgres", "psycopg", "django") if not _importable(m)]
    if missing:
        note(f"channels_postgres omitted: {', '.join(missing)} not installed")
        return None
    database = _database_settings(postgres_url)
    try:
        version = _set_up(database)
    except Exception as exc:  # any failure means the same: no column
        note(f"channels_postgres omitted: could not set it up ({describe(exc)})")
        return None
    note(f"channels_postgres {version} on the same database (schema {BENCH_SCHEMA})")

    def factory() -> ChannelLayer:
        from channels_postgres.core import PostgresChannelLayer

        layer = PostgresChannelLayer(
            **database,
            expiry=EXPIRY_S,
            capacity=CAPACITY,
            group_expiry=86400,
            # Small pools: one per instance, and instances stand for processes.
            PSYCOPG_OPTIONS={"min_size": 1, "max_size": 4},
        )
        _as_own_process(layer)
        instance: ChannelLayer = layer
        return instance

    return Target(
        "channels_postgres", lambda note: contextlib.nullcontext(Opened(factory)), is_ours=False
    )


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _database_settings(url: str) -> dict[str, Any]:
    """Django's DATABASES entry for the database of a postgresql:// URL."""
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or "postgres"),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or 5432),
        "OPTIONS": {"options": f"-c search_path={BENCH_SCHEMA}"},
    }


def _set_up(database: dict[str, Any]) -> str:
    """Configure Django, create the schema, apply channels_postgres's migrations."""
    import importlib.metadata

    import django
    import psycopg
    from django.conf import settings
    from django.core.management import call_command

    with psycopg.connect(
        host=database["HOST"],
        port=database["PORT"],
        user=database["USER"],
        password=database["PASSWORD"] or None,
        dbname=database["NAME"],
        autocommit=True,
    ) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {BENCH_SCHEMA}")
    if not settings.configured:
        settings.configure(
            INSTALLED_APPS=["channels_postgres"],
            DATABASES={"default": database, "channels_postgres": database},
            USE_TZ=True,
        )
        django.setup()
    call_command("migrate", "channels_postgres", database="channels_postgres", verbosity=0)
    return importlib.metadata.version("channels_postgres")


def _as_own_process(layer: Any) -> None:
    """Give one instance the pool and the channel queues a process of its own would have.

    channels_postgres keeps both per process (module globals), where the bench makes
    several instances in one process to stand for several processes. Shared, every
    instance's listener would feed every queue (one message received several times),
    and a pool made on a loop that has since closed would fail every call.
    """
    queues: dict[str, asyncio.Queue[str]] = {}

    def get_or_create_queue(channel: str) -> asyncio.Queue[str]:
        return queues.setdefault(channel, asyncio.Queue())

    pool = _InstancePool(layer.django_db)
    layer._get_or_create_queue = get_or_create_queue
    layer.django_db.get_db_pool = pool.get
    layer.close = pool.close
    _listen_before_sending(layer)


class _InstancePool:
    """One instance's psycopg pool, opened on first use, in place of the per-process one."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self._pools: list[Any] = []
        self._lock = asyncio.Lock()

    async def get(self, db_params: dict[str, Any]) -> Any:
        """channels_postgres's ``get_db_pool``, which calls it with ``db_params=`` by name."""
        import psycopg
        import psycopg_pool

        async with self._lock:
            if not self._pools:

                async def configure(conn: Any) -> None:
                    await conn.set_autocommit(True)

                conninfo = psycopg.conninfo.make_conninfo(conninfo="", **db_params)
                pool = psycopg_pool.AsyncConnectionPool(
                    conninfo=conninfo, open=False, configure=configure, **self._db.psycopg_options
                )
                await pool.open(wait=True)
                self._pools.append(pool)
            return self._pools[0]

    async def close(self) -> None:
        if self._pools:
            await self._pools.pop().close()


#: Per event loop: the listeners of the instances made on it, started or starting.
_listeners: dict[asyncio.AbstractEventLoop, list[asyncio.Task[None]]] = {}


def _listen_before_sending(layer: Any) -> None:
    """Start the instance's listener now, and hold back sends until all are listening.

    channels_postgres drops messages sent while a receiver's listener is starting (it
    reads what waits, then LISTENs), and starts one listener per receive when several
    receives begin at once, each delivering every message. A long-running consumer
    is past both; so is the instance here before any scenario sends.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # a sync caller: its first call runs on a loop of its own
    for old in [other for other in _listeners if other.is_closed()]:
        del _listeners[old]
    started = _listeners.setdefault(loop, [])

    async def listen() -> None:
        event, is_new = layer._get_or_create_listener_task()
        if is_new:
            loop.create_task(layer.listen_to_all_channels())
        await event.wait()

    started.append(loop.create_task(listen()))
    for name in ("send", "group_send"):
        original = getattr(layer, name)

        async def after_listeners(*args: Any, _original: Any = original) -> None:
            await asyncio.gather(*started)
            await _original(*args)

        setattr(layer, name, after_listeners)
