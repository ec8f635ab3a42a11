"""PostgreSQL for the tests: the server at DATABASE_URL, or throwaway ones of our own.

``backend_url("postgresql://")`` gives the URL every PostgreSQL-backed test uses: the
server at ``DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``)
if it answers, else a server made with initdb/pg_ctl in a temporary directory on a free
port, started once per session. Each session works in a schema of its own
(``cbtest_<random>``, dropped at exit), so runs never see each other's data.

``PostgresServer`` is such a throwaway server, for tests that restart or kill the
database: those never touch the shared one.

If PostgreSQL can be neither reached nor started, the session fails with a message
that says what to install; outside CI, ``CHANNELS_BROKER_SKIP_POSTGRES=1`` turns that
into a skip (under ``CI=true`` a backend that cannot be tested is always a failure).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.ports import free_port

__all__ = [
    "POSTGRES_PARAMS",
    "PostgresServer",
    "backend_url",
    "can_make_servers",
    "drop_schema",
    "is_answering",
    "session_schema",
    "with_schema",
]

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Backend parameters for ``BACKEND_URLS``, resolved by ``backend_url``.
POSTGRES_PARAMS = ["postgresql://"]
#: One schema per test session: sessions running at once share the server at 5432.
session_schema = f"cbtest_{uuid.uuid4().hex[:10]}"
#: pg_ctl waits this long for a start or stop.
PG_CTL_TIMEOUT_S = 60

_resolved: dict[str, str] = {}
_servers: list[PostgresServer] = []
_schemas: list[str] = []


def _bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else the newest under /usr/lib/postgresql."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key)
    return candidates[-1] if candidates else None


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def can_make_servers() -> bool:
    """True if initdb and pg_ctl are installed (throwaway servers can be made)."""
    return _bin("initdb") is not None and _bin("pg_ctl") is not None


def is_answering(url: str, timeout_s: float = 3.0) -> bool:
    """True if a PostgreSQL at ``url`` accepts a connection and answers a query."""
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(url, timeout=timeout_s)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    def run_probe() -> None:
        asyncio.run(asyncio.wait_for(probe(), timeout_s))

    # In a thread of its own: the first use of a PostgreSQL URL may come from inside a
    # running test's event loop, where asyncio.run refuses (the probe then never ran,
    # the answer was a wrong "no", and a throwaway server was started for nothing).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(run_probe).result()
        except Exception:  # whatever went wrong, the answer is no
            return False
    return True


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``schema=<schema>`` added to its query."""
    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, f"schema={schema}"]))
    return urlunsplit(parts._replace(query=query))


def drop_schema(url: str, schema: str) -> None:
    """Drop ``schema`` and everything in it (best effort)."""
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    with contextlib.suppress(Exception):  # the server may be gone already
        asyncio.run(asyncio.wait_for(drop(), 30))


class PostgresServer:
    """A PostgreSQL of our own: initdb in a temp dir, pg_ctl on a free port.

    As root (CI, this machine) the server runs as the ``postgres`` user, since
    PostgreSQL refuses to run as root. It runs without fsync: a clean stop still
    writes everything, and no test pulls the power.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cb-postgres-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            shutil.chown(self.dir, user=self._user)
        _servers.append(self)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            args, user=self._user, capture_output=True, text=True, timeout=PG_CTL_TIMEOUT_S + 10
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                f"\n{self.log()}"
            )

    def start(self) -> None:
        """initdb on first use, then start and wait until it accepts connections."""
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError(
                "initdb/pg_ctl not found: install postgresql (apt-get install postgresql)"
            )
        if not self.data.exists():
            self._run(
                initdb,
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                  "-w", "-t", str(PG_CTL_TIMEOUT_S), "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop (``fast``: roll back open transactions, write everything, exit)."""
        pg_ctl = _bin("pg_ctl")
        if pg_ctl is not None and self.is_running():
            self._run(
                pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", str(PG_CTL_TIMEOUT_S), "stop"
            )

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster: a crash (its children exit once they notice)."""
        pid = self._postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Stop the server (immediately) and remove its directory."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(ValueError):
            _servers.remove(self)


def _unavailable(why: str) -> NoReturn:
    message = (
        f"PostgreSQL tests cannot run: {why}. Set DATABASE_URL to a reachable server, or "
        "install postgresql (initdb, pg_ctl) so the tests can start one of their own."
    )
    if os.environ.get("CI") != "true" and os.environ.get("CHANNELS_BROKER_SKIP_POSTGRES") == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def _server_url() -> str:
    """DATABASE_URL if it answers, else a throwaway server started now (once)."""
    url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    if is_answering(url):
        return url
    if not can_make_servers():
        _unavailable(f"nothing answers at {url} and initdb/pg_ctl are not installed")
    server = PostgresServer()
    try:
        server.start()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        server.cleanup()
        _unavailable(f"nothing answers at {url} and a server of our own did not start: {exc}")
    return server.url


def backend_url(param: str) -> str:
    """The URL to test for ``postgresql://``: a server (found or started) and our schema."""
    if param not in _resolved:
        server = _server_url()
        _schemas.append(server)
        _resolved[param] = with_schema(server, session_schema)
    return _resolved[param]


@atexit.register
def _tidy_up() -> None:
    for server_url in _schemas:
        drop_schema(server_url, session_schema)
    for server in list(_servers):
        server.cleanup()
