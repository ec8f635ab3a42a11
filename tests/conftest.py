"""Fixtures shared by every test package: a real daemon per backend, layers, async tests.

Async tests are plain ``async def`` functions: ``pytest_pyfunc_call`` below runs each in
a fresh loop with ``asyncio.run`` and closes the layers it made inside that loop, before
the loop goes away. Sync tests stay sync, so they may call ``async_to_sync`` (which
refuses to run inside a running loop), as Django code does.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import pytest

from tests import pg_server, servers
from tests.ports import free_port, free_ports
from tests.waits import DELIVERY_TIMEOUT_S, POLL_S, START_TIMEOUT_S

#: Every layer test runs once per backend URL. More are added as their servers are.
BACKEND_URLS = [
    "memory://",
    *pg_server.POSTGRES_PARAMS,
    *servers.REDIS_PARAMS,
]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: tests/soak runs by ``make soak`` only (it sets the duration), until it reconciles on
#: both storages: on Redis it does (a worker's message is leased until its consumer
#: acknowledges it, issue 15); on PostgreSQL a daemon SIGKILLed within 20 ms of handing
#: out a worker's message gives it again, possibly to another worker process (its
#: leases are ended by the daemon, not yet by the consumer), and a message pushed to a
#: client's own channel in the killed daemon's hands is lost (at most once, any storage).
collect_ignore = [] if os.environ.get("CHANNELS_BROKER_SOAK_SECONDS") else ["soak"]

T = TypeVar("T")


def _backend_id(url: str) -> str:
    return urlsplit(url).scheme


class BrokerProcess:
    """One ``channels-broker serve`` subprocess on fixed ports, restartable in place.

    Its stderr goes to a file, so it can be read at any time (``stderr_text``) without
    a pipe that fills up, and survives restarts (each start appends to it).
    """

    def __init__(
        self,
        backend_url: str,
        *,
        token: str | None = None,
        unix_path: str | None = None,
        max_message_bytes: int | None = None,
        extra_args: tuple[str, ...] = (),
        open_files: int | None = None,
    ) -> None:
        """``open_files``: the daemon's RLIMIT_NOFILE (soft and hard), if given."""
        self.backend_url = backend_url
        #: More ``serve`` flags, as given (``("--token-file", path)``).
        self.extra_args = extra_args
        self.token = token
        self.unix_path = unix_path
        self.max_message_bytes = max_message_bytes
        self.open_files = open_files
        # One call: two calls may return the same port (each socket is closed between).
        self.port, self.metrics_port = free_ports(2)
        self.process: subprocess.Popen[bytes] | None = None
        fd, log_name = tempfile.mkstemp(prefix="channels-broker-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_name)

    @property
    def url(self) -> str:
        """The ``hosts`` entry a layer uses to reach this daemon over TCP."""
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def command(self) -> list[str]:
        args = [
            sys.executable, "-m", "broker", "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--backend", self.backend_url,
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--log-level", "info",
        ]  # fmt: skip
        if self.token is not None:
            args += ["--token", self.token]
        if self.unix_path is not None:
            args += ["--unix", self.unix_path]
        if self.max_message_bytes is not None:
            args += ["--max-message-bytes", str(self.max_message_bytes)]
        return [*args, *self.extra_args]

    def _limit_open_files(self) -> None:
        # Runs in the child between fork and exec.
        if self.open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the daemon and return once its TCP port accepts connections."""
        assert not self.is_running(), "daemon already running"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=self._limit_open_files if self.open_files is not None else None,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                self._fail(f"daemon exited with code {self.process.returncode} before ready")
            try:
                with socket.create_connection(self.address, timeout=1.0):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                self._fail(f"daemon did not accept connections within {START_TIMEOUT_S} s")
            time.sleep(POLL_S)

    def stop(self) -> int:
        """SIGTERM and wait; return the exit code. Fails the test if it does not stop."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process is not None else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            self._fail(f"daemon did not stop within {START_TIMEOUT_S} s of SIGTERM")

    def kill(self) -> None:
        """SIGKILL and reap: the connection cut a crash or power loss makes."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Stop cleanly and start again on the same ports."""
        code = self.stop()
        if code != 0:
            self._fail(f"daemon exited with code {code} on SIGTERM")
        self.start()

    def stderr_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(
        self, predicate: Callable[[str], bool], timeout_s: float = DELIVERY_TIMEOUT_S
    ) -> str:
        """Return the first log line matching ``predicate``, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.stderr_text().splitlines():
                if predicate(line):
                    return line
            if time.monotonic() > deadline:
                pytest.fail(f"no matching daemon log line in {timeout_s} s\n{self.log_tail()}")
            time.sleep(POLL_S)

    def log_tail(self, lines: int = 60) -> str:
        text = "\n".join(self.stderr_text().splitlines()[-lines:])
        return f"--- daemon stderr ({self.log_path}) ---\n{text}\n--- end ---"

    def _fail(self, reason: str) -> NoReturn:
        pytest.fail(f"{reason}: {' '.join(self.command())}\n{self.log_tail()}", pytrace=False)

    def cleanup(self) -> None:
        """Stop the daemon; fail if SIGTERM did not give exit code 0. Remove its log."""
        try:
            code = self.stop()
            if code != 0:
                self._fail(f"daemon exited with code {code} on SIGTERM")
        finally:
            self.kill()
            self.log_path.unlink(missing_ok=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the backends a ``backends("memory"|"shared")`` test is not for;
    a URL scheme ("redis") names one backend.

    Some behaviours belong to one kind of storage (a memory daemon forgets on restart;
    exact gauges need storage no other test writes to). Those tests say so with the
    marker, so that a skip in the report always means something could not be tested.
    """
    selected, deselected = [], []
    for item in items:
        marker = item.get_closest_marker("backends")
        kind = _backend_kind(item)
        if marker is None or kind is None:
            selected.append(item)
            continue
        (selected if kind in marker.args or _scheme(item) in marker.args else deselected).append(
            item
        )
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def _backend_kind(item: pytest.Item) -> str | None:
    """ "memory" or "shared" for a test bound to one backend, else None.

    The backend comes from the ``backend_url`` parameter, or, in a module that
    overrides that fixture with one storage, from the module's ``BACKEND_KIND``.
    """
    callspec = getattr(item, "callspec", None)
    url = callspec.params.get("backend_url") if callspec is not None else None
    if url is None:
        module = getattr(item, "module", None)
        kind: str | None = getattr(module, "BACKEND_KIND", None)
        return kind
    return "memory" if str(url).startswith("memory:") else "shared"


def _scheme(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    url = callspec.params.get("backend_url") if callspec is not None else None
    return None if url is None else _backend_id(str(url))


@pytest.fixture(
    scope="session",
    params=[pytest.param(url, id=_backend_id(url)) for url in BACKEND_URLS],
)
def backend_url(request: pytest.FixtureRequest) -> str:
    """Each backend URL in turn; every test that needs a daemon runs once per URL."""
    url: str = servers.backend_url(request.param)
    return url


@pytest.fixture(scope="module")
def _module_broker(backend_url: str) -> Iterator[BrokerProcess]:
    process = BrokerProcess(backend_url)
    process.start()
    yield process
    process.cleanup()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Keep each phase's report on the item, so fixtures can tell a failed test at teardown.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


@pytest.fixture
def broker(
    _module_broker: BrokerProcess, request: pytest.FixtureRequest
) -> Iterator[BrokerProcess]:
    """A running daemon, shared by the tests of one module (tests use unique names).

    Tests that stop, kill or restart a daemon take ``own_broker`` instead. When a test
    fails, the daemon's log lines written during it are printed with the report.
    """
    if not _module_broker.is_running():
        # An earlier test broke it; that test's failure says why. Start afresh.
        _module_broker.start()
    log_start = _module_broker.log_path.stat().st_size
    yield _module_broker
    if _test_failed(request):
        with _module_broker.log_path.open("rb") as log:
            log.seek(log_start)
            lines = log.read().decode(errors="replace")
        print(f"--- daemon stderr during this test ---\n{lines}--- end ---")


@pytest.fixture
def broker_factory(
    backend_url: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., BrokerProcess]]:
    """Make extra daemons (``token=``, ``max_message_bytes=``...); stopped at teardown."""
    made: list[BrokerProcess] = []

    def factory(**options: Any) -> BrokerProcess:
        process = BrokerProcess(backend_url, **options)
        made.append(process)
        process.start()
        return process

    yield factory
    for process in made:
        if _test_failed(request):
            print(process.log_tail())
        process.cleanup()


@pytest.fixture
def own_broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A daemon for this test alone, free to be stopped, killed or restarted."""
    return broker_factory()


class LayerFactory:
    """``make_layer(**config)``: a layer pointed at the test's daemon.

    Every layer made is closed at the end of the test, in the test's own loop for
    async tests (see ``pytest_pyfunc_call``), else in a fresh loop.
    """

    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        self.layers: list[Any] = []

    def __call__(self, **config: Any) -> Any:
        from broker.layer import BrokerChannelLayer

        config.setdefault("hosts", [self.broker.url])
        layer = BrokerChannelLayer(**config)
        self.layers.append(layer)
        return layer

    async def aclose(self) -> None:
        layers, self.layers = self.layers, []
        for layer in layers:
            await layer.close()


def _layers_of(broker: BrokerProcess) -> Iterator[LayerFactory]:
    factory = LayerFactory(broker)
    yield factory
    if factory.layers:  # a sync test's layers; an async test's are closed in its loop
        asyncio.run(factory.aclose())


@pytest.fixture
def make_layer(broker: BrokerProcess) -> Iterator[LayerFactory]:
    yield from _layers_of(broker)


@pytest.fixture
def make_own_layer(own_broker: BrokerProcess) -> Iterator[LayerFactory]:
    """``make_layer`` for the test's own daemon (``own_broker``)."""
    yield from _layers_of(own_broker)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """``unique("chat")`` -> a fresh valid name, so tests sharing a daemon never meet."""

    def make(stem: str) -> str:
        return f"{stem}-{uuid.uuid4().hex[:12]}"

    return make


class LoopThread:
    """An event loop running in its own thread, like a Daphne server's main loop.

    Lets a sync test keep a long-lived consumer loop while it calls ``async_to_sync``
    from the main thread, which has no running loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        return self.submit(coro).result(timeout_s)

    def stop(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        if self.loop.is_running():
            self.run(drain())
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[Callable[[], LoopThread]]:
    """Start ``LoopThread``s; each is stopped and closed at teardown."""
    started: list[LoopThread] = []

    def start() -> LoopThread:
        thread = LoopThread()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


def _layer_factories(funcargs: dict[str, Any]) -> list[LayerFactory]:
    return [value for value in funcargs.values() if isinstance(value, LayerFactory)]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests in a fresh event loop (no pytest-asyncio needed)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    funcargs = pyfuncitem.funcargs
    kwargs = {name: funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def run() -> None:
        test: Awaitable[None] = pyfuncitem.obj(**kwargs)
        try:
            await test
        finally:
            # Close layers in the loop that opened their connections.
            for factory in _layer_factories(funcargs):
                await factory.aclose()

    asyncio.run(run())
    return True


def count_open_sockets() -> int:
    """Sockets this process holds open (Linux: entries of /proc/self/fd)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue  # the fd of the listdir itself, or one closed meanwhile
    return count


@pytest.fixture
def open_sockets() -> Callable[[], int]:
    return count_open_sockets


@pytest.fixture
def dead_url() -> str:
    """A ``hosts`` entry where nothing listens: any I/O through it fails or hangs."""
    return f"tcp://127.0.0.1:{free_port()}"
