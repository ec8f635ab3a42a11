"""The ``channels-broker bench`` command: channel layers measured side by side, with ratios."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

import click

from broker.errors import BrokerError

__all__ = [
    "SCENARIOS",
    "BenchError",
    "ChannelLayer",
    "LayerFactory",
    "Row",
    "Scenario",
    "Target",
    "bench",
    "build_targets",
    "run_target",
]

#: Large enough that no scenario meets ChannelFull: we measure speed, not back-pressure.
CAPACITY = 100_000
#: Channels' default message expiry.
EXPIRY_S = 60
#: Sends in flight at once: keeps the pipe busy without becoming an unbounded burst.
SEND_WINDOW = 64
PING_PONG_EXCHANGES = 2000
#: Warm-up round trips are not timed: they pay for connecting and the first allocations.
PING_PONG_WARMUP = 200
#: Sized so channels_redis (~1,000 Redis commands/s from one process) keeps the run < 2 min.
STREAM_MESSAGES = 5000
WORKER_MESSAGES = 5000
WORKER_COUNT = 4
FANOUT_MEMBERS = 200
FANOUT_INSTANCES = 4
FANOUT_SENDS = 100
SYNC_CALLS = 300
#: A hung layer must fail its scenario, not the run; a healthy default scenario takes < 15 s.
SCENARIO_TIMEOUT_S = 30.0
DAEMON_START_TIMEOUT_S = 15.0
DAEMON_STOP_TIMEOUT_S = 10.0
DEFAULT_BACKEND = "memory://"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: About the size of a chat message; envelope-only messages would flatter per-byte costs.
BODY = "x" * 100
WORK_CHANNEL = "bench-work"
FANOUT_GROUP = "bench-fanout"
SYNC_GROUP = "bench-sync"
WARM_UP_GROUP = "bench-warm-up"
#: (label, distribution) of the libraries whose versions move the numbers.
VERSIONS_SHOWN = (
    ("channels", "channels"),
    ("channels_redis", "channels-redis"),
    ("redis-py", "redis"),
)
#: The directory holding the ``broker`` package, so the daemon runs the code this bench runs.
SOURCE_ROOT = Path(__file__).resolve().parent.parent


class ChannelLayer(Protocol):
    """The Channels layer API the scenarios use; ``close`` is optional (see ``close_layer``)."""

    async def send(self, channel: str, message: dict[str, Any]) -> None: ...
    async def receive(self, channel: str) -> dict[str, Any]: ...
    async def new_channel(self) -> str: ...
    async def group_add(self, group: str, channel: str) -> None: ...
    async def group_discard(self, group: str, channel: str) -> None: ...
    async def group_send(self, group: str, message: dict[str, Any]) -> None: ...
    async def flush(self) -> None: ...


#: Each call makes a new, separate instance: a new connection, as another process would have.
LayerFactory = Callable[[], ChannelLayer]
#: Takes one line for the notes printed under the table.
Note = Callable[[str], None]
#: Per target, per scenario name.
Results = dict[str, dict[str, "Outcome"]]


@dataclass(frozen=True, slots=True)
class Target:
    """A layer under test; ``open`` brings up what it needs (a daemon) and yields its factory."""

    name: str
    open: Callable[[Note], contextlib.AbstractContextManager[LayerFactory]]
    is_ours: bool


@dataclass(frozen=True, slots=True)
class Row:
    """One measured number of a scenario: a table row."""

    label: str
    unit: str
    is_higher_better: bool


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named measurement; ``run(factory, scale)`` returns one value per row."""

    name: str
    rows: tuple[Row, ...]
    run: Callable[[LayerFactory, float], list[float]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """A scenario's values (if it measured any) and why it failed (if it did)."""

    values: list[float] | None = None
    error: str | None = None


class BenchError(BrokerError):
    """A scenario did not finish or did not verify; the message says what was seen."""


class Unverified(BenchError):
    """The scenario finished and measured ``values``, but the deliveries were wrong."""

    def __init__(self, problem: str, values: list[float]) -> None:
        super().__init__(problem)
        self.values = values


class Tally:
    """Which of ``expected`` numbered deliveries arrived, how often, and when the last did."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = bytearray(expected)
        self.count = 0
        self.duplicates = 0
        self.finished_at = 0.0
        self.done = asyncio.Event()

    def record(self, index: int) -> None:
        if self.seen[index]:
            self.duplicates += 1
            return
        self.seen[index] = 1
        self.count += 1
        if self.count == self.expected:
            self.finished_at = time.perf_counter()
            self.done.set()

    def rate(self, started: float) -> list[float]:
        """Distinct deliveries per second since ``started``; ``Unverified`` if any repeated."""
        rate = [self.expected / (self.finished_at - started)]
        if self.duplicates:
            raise Unverified(f"{self.duplicates} of {self.expected} delivered twice", rate)
        return rate


def scaled(count: int, scale: float) -> int:
    # Two at least, so a percentile or a rate is still defined at tiny scales.
    return max(2, round(count * scale))


def message(index: int) -> dict[str, Any]:
    return {"type": "bench.message", "i": index, "text": BODY}


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def close_layer(layer: object) -> None:
    """Close by ``close()``, or ``close_pools()`` for channels_redis, which has no ``close``."""
    close = getattr(layer, "close", None) or getattr(layer, "close_pools", None)
    if close is not None:
        await close()


async def flush(factory: LayerFactory) -> None:
    layer = factory()
    try:
        await layer.flush()
    finally:
        await close_layer(layer)


@contextlib.asynccontextmanager
async def open_layers(factory: LayerFactory, count: int) -> AsyncIterator[list[ChannelLayer]]:
    """``count`` separate instances for the body, closed after it."""
    layers = [factory() for _ in range(count)]
    try:
        await warm_up(layers)
        yield layers
    finally:
        for layer in layers:
            await close_layer(layer)


@contextlib.asynccontextmanager
async def running(
    loops: Iterable[Coroutine[Any, Any, None]],
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run receive loops during the body, then cancel them; a loop that had crashed fails it."""
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        yield tasks
    except BaseException as exc:
        failure = await stop_loops(tasks)
        # A body that hung is best explained by a dead loop; any other error explains itself.
        if failure is not None and isinstance(exc, asyncio.CancelledError | TimeoutError):
            raise BenchError(f"a receive loop failed: {describe(failure)}") from failure
        raise
    failure = await stop_loops(tasks)
    if failure is not None:
        raise BenchError(f"a receive loop failed: {describe(failure)}") from failure


async def stop_loops(tasks: Sequence[asyncio.Task[None]]) -> BaseException | None:
    """Cancel ``tasks``; return the error of one that had failed before it was cancelled."""
    crashed = [task for task in tasks if task.done() and not task.cancelled()]
    for task in tasks:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    # Errors raised while being cancelled are teardown noise (channels_redis may raise a
    # socket timeout instead of CancelledError): the measurement is complete by then.
    noisy = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    if len(noisy) > len(crashed):
        progress(f"  teardown: a cancelled receive raised {describe(noisy[-1])}")
    return next((exc for t in crashed if (exc := t.exception()) is not None), None)


async def warm_up(layers: Sequence[ChannelLayer], concurrency: int = 1) -> None:
    """Connect before the clock starts: layers connect lazily, on their first calls.

    ``concurrency`` calls at once let a pooled client (channels_redis) open as many
    connections as a window of sends will use.
    """
    calls = [layer for layer in layers for _ in range(concurrency)]
    await asyncio.gather(*(layer.group_discard(WARM_UP_GROUP, WARM_UP_GROUP) for layer in calls))


async def drain(layer: ChannelLayer, channel: str, tally: Tally, offset: int = 0) -> None:
    while True:
        received = await layer.receive(channel)
        tally.record(offset + received["i"])


async def wait_done(tally: Tally, tasks: Sequence[asyncio.Task[None]]) -> None:
    """Wait until every delivery arrived, a receive loop died, or the time is up."""
    waiter = asyncio.create_task(tally.done.wait())
    await asyncio.wait([waiter, *tasks], timeout=SCENARIO_TIMEOUT_S, return_when="FIRST_COMPLETED")
    waiter.cancel()
    if not tally.done.is_set():
        seen = f"after {tally.count} of {tally.expected} deliveries ({tally.duplicates} repeated)"
        dead = [task for task in tasks if task.done() and not task.cancelled()]
        if dead and (exc := dead[0].exception()) is not None:
            raise BenchError(f"a receive loop failed {seen}: {describe(exc)}") from exc
        raise BenchError(f"timed out {seen}")


async def send_windowed(layer: ChannelLayer, channel: str, count: int) -> None:
    """Send ``count`` numbered messages, at most ``SEND_WINDOW`` in flight."""
    for start in range(0, count, SEND_WINDOW):
        end = min(start + SEND_WINDOW, count)
        await asyncio.gather(*(layer.send(channel, message(i)) for i in range(start, end)))


def percentile(ordered: Sequence[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def echo(layer: ChannelLayer, own: str, peer: str) -> None:
    while True:
        await layer.send(peer, await layer.receive(own))


async def round_trip(layer: ChannelLayer, own: str, peer: str, index: int) -> int:
    started = time.perf_counter_ns()
    await layer.send(peer, message(index))
    reply = await layer.receive(own)
    elapsed_ns = time.perf_counter_ns() - started
    if reply.get("i") != index:
        raise BenchError(f"round trip {index} got the reply to {reply.get('i')!r}")
    return elapsed_ns


async def ping_pong(factory: LayerFactory, scale: float) -> list[float]:
    """A sends to B's channel, B echoes to A's; p50 and p99 round trip in microseconds."""
    warmup, exchanges = scaled(PING_PONG_WARMUP, scale), scaled(PING_PONG_EXCHANGES, scale)
    async with open_layers(factory, 2) as (a, b):
        a_channel, b_channel = await a.new_channel(), await b.new_channel()
        async with running([echo(b, b_channel, a_channel)]):
            rtts_ns = [
                await round_trip(a, a_channel, b_channel, i) for i in range(warmup + exchanges)
            ]
    timed = sorted(rtts_ns[warmup:])
    return [percentile(timed, 0.50) / 1000, percentile(timed, 0.99) / 1000]


async def stream(factory: LayerFactory, scale: float) -> list[float]:
    """One producer to one consumer's process-specific channel; msgs/s."""
    count = scaled(STREAM_MESSAGES, scale)
    async with open_layers(factory, 2) as (producer, consumer):
        channel = await consumer.new_channel()
        tally = Tally(count)
        await warm_up([producer], SEND_WINDOW)
        async with running([drain(consumer, channel, tally)]) as tasks:
            started = time.perf_counter()
            await send_windowed(producer, channel, count)
            await wait_done(tally, tasks)
    return tally.rate(started)


async def workers(factory: LayerFactory, scale: float) -> list[float]:
    """One producer to a normal channel pulled by several workers; msgs/s, each once."""
    count = scaled(WORKER_MESSAGES, scale)
    async with open_layers(factory, WORKER_COUNT + 1) as (producer, *pullers):
        tally = Tally(count)
        await warm_up([producer], SEND_WINDOW)
        async with running(drain(layer, WORK_CHANNEL, tally) for layer in pullers) as tasks:
            started = time.perf_counter()
            await send_windowed(producer, WORK_CHANNEL, count)
            await wait_done(tally, tasks)
    return tally.rate(started)


async def fan_out(factory: LayerFactory, scale: float) -> list[float]:
    """group_sends to a group spread over several instances; deliveries/s."""
    sends = scaled(FANOUT_SENDS, scale)
    per_instance = FANOUT_MEMBERS // FANOUT_INSTANCES
    async with open_layers(factory, FANOUT_INSTANCES + 1) as (sender, *hosts):
        members = [
            (layer, await layer.new_channel()) for layer in hosts for _ in range(per_instance)
        ]
        for layer, channel in members:
            await layer.group_add(FANOUT_GROUP, channel)
        await prime(sender, members)
        tally = Tally(len(members) * sends)
        # Member j's k-th message is delivery j * sends + k, so each is counted exactly once.
        loops = (drain(layer, ch, tally, j * sends) for j, (layer, ch) in enumerate(members))
        async with running(loops) as tasks:
            started = time.perf_counter()
            for k in range(sends):
                await sender.group_send(FANOUT_GROUP, message(k))
            await wait_done(tally, tasks)
        for layer, channel in members:
            await layer.group_discard(FANOUT_GROUP, channel)
    return tally.rate(started)


async def prime(sender: ChannelLayer, members: Sequence[tuple[ChannelLayer, str]]) -> None:
    """One untimed group_send every member receives: consumers already past their first
    receive, as on a live site. channels_postgres drops what reaches a channel before
    that channel's first receive in a process (it claims the channel then)."""
    receives = [asyncio.create_task(layer.receive(channel)) for layer, channel in members]
    await asyncio.sleep(0.5)  # let every receive reach its layer before the send
    await sender.group_send(FANOUT_GROUP, {"type": "bench.prime"})
    async with asyncio.timeout(SCENARIO_TIMEOUT_S):
        await asyncio.gather(*receives)


def sync_calls(factory: LayerFactory, calls: int) -> float:
    """Seconds for ``calls`` async_to_sync(group_send) calls, each on a loop of its own."""
    from asgiref.sync import async_to_sync

    layer = factory()
    started = time.perf_counter()
    for _ in range(calls):
        async_to_sync(layer.group_send)(SYNC_GROUP, {"type": "x"})
    elapsed_s = time.perf_counter() - started
    async_to_sync(close_layer)(layer)
    return elapsed_s


def sync_group_send(factory: LayerFactory, scale: float) -> list[float]:
    """group_send from a plain thread with no event loop, as a Celery task or view does."""
    calls = scaled(SYNC_CALLS, scale)
    outcome: list[float | BaseException] = []

    def call() -> None:
        try:
            outcome.append(sync_calls(factory, calls))
        except BaseException as exc:  # handed to the caller's thread below
            outcome.append(exc)

    thread = threading.Thread(target=call, name="bench-sync", daemon=True)
    thread.start()
    thread.join(SCENARIO_TIMEOUT_S)
    if not outcome:
        raise BenchError(f"not done after {SCENARIO_TIMEOUT_S:.0f} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return [calls / outcome[0]]


def in_new_loop(
    body: Callable[[LayerFactory, float], Coroutine[Any, Any, list[float]]],
) -> Callable[[LayerFactory, float], list[float]]:
    """Run ``body`` on a fresh event loop, bounded in time (``wait_done`` has its own bound)."""

    def run(factory: LayerFactory, scale: float) -> list[float]:
        async def bounded() -> list[float]:
            async with asyncio.timeout(SCENARIO_TIMEOUT_S * 1.5):
                return await body(factory, scale)

        return asyncio.run(bounded())

    return run


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "ping-pong",
        (Row("ping-pong p50", "us", False), Row("ping-pong p99", "us", False)),
        in_new_loop(ping_pong),
    ),
    Scenario("stream", (Row("stream", "msg/s", True),), in_new_loop(stream)),
    Scenario("workers", (Row(f"workers x{WORKER_COUNT}", "msg/s", True),), in_new_loop(workers)),
    Scenario(
        "fan-out", (Row(f"fan-out x{FANOUT_MEMBERS}", "deliveries/s", True),), in_new_loop(fan_out)
    ),
    Scenario("sync", (Row("sync group_send", "calls/s", True),), sync_group_send),
)


def free_ports(count: int) -> list[int]:
    # All bound at once so that two calls cannot hand out the same port.
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def log_text(log: IO[bytes], max_lines: int = 8) -> str:
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    return " | ".join(lines[:max_lines]) + (" | ..." if len(lines) > max_lines else "")


def wait_listening(process: subprocess.Popen[bytes], port: int, log: IO[bytes]) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"daemon exited with {process.returncode}: {log_text(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        # Another process offers no event to wait on but its port, so poll it briefly.
        time.sleep(0.05)
    raise BenchError(f"daemon not listening on port {port} after {DAEMON_START_TIMEOUT_S:.0f} s")


def stop_daemon(process: subprocess.Popen[bytes], note: Note) -> None:
    if process.poll() is not None:
        note(f"daemon had exited by itself with code {process.returncode}")
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(DAEMON_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        note(f"daemon still running {DAEMON_STOP_TIMEOUT_S:.0f} s after SIGTERM; killed")
        return
    if process.returncode != 0:
        note(f"daemon exited with code {process.returncode} after SIGTERM")


@contextlib.contextmanager
def daemon(backend_url: str, note: Note) -> Iterator[str]:
    """A ``channels-broker serve`` subprocess on free ports; yields its ``tcp://`` address."""
    port, metrics_port = free_ports(2)
    command = [sys.executable, "-m", "broker", "serve", "--listen", f"127.0.0.1:{port}"]
    command += ["--backend", backend_url, "--metrics-listen", f"127.0.0.1:{metrics_port}"]
    command += ["--log-level", "warning"]
    path = os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path}
        )
        try:
            wait_listening(process, port, log)
        except BaseException:
            process.kill()  # its log is in the error already
            process.wait()
            raise
        try:
            yield f"tcp://127.0.0.1:{port}"
        finally:
            stop_daemon(process, note)
            if text := log_text(log):
                note(f"daemon ({backend_url}) logged: {text}")


def broker_factory(address: str) -> LayerFactory:
    from broker.layer.channel_layer import BrokerChannelLayer

    return functools.partial(
        BrokerChannelLayer, hosts=[address], capacity=CAPACITY, expiry=EXPIRY_S
    )


def daemon_target(name: str, backend_url: str) -> Target:
    @contextlib.contextmanager
    def open_target(note: Note) -> Iterator[LayerFactory]:
        with daemon(backend_url, note) as address:
            yield broker_factory(address)

    return Target(name, open_target, is_ours=True)


def running_target(address: str) -> Target:
    def open_target(note: Note) -> contextlib.AbstractContextManager[LayerFactory]:
        return contextlib.nullcontext(broker_factory(address))

    return Target(f"broker ({address})", open_target, is_ours=True)


def probe_redis(url: str) -> str:
    """The Redis server's version; raises if it does not answer PING."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
        client.ping()
        return str(client.info("server").get("redis_version", "?"))


def channels_redis_target(redis_url: str, note: Note) -> Target | None:
    """channels_redis on ``redis_url``, or ``None`` with a note saying why not."""
    if importlib.util.find_spec("channels_redis") is None:
        note("channels_redis omitted: not installed (pip install 'channels-broker[bench]')")
        return None
    try:
        version = probe_redis(redis_url)
    except Exception as exc:  # any failure means the same: no column
        note(f"channels_redis omitted: Redis at {redis_url} did not answer PING ({describe(exc)})")
        return None
    note(f"channels_redis on {redis_url} (redis-server {version})")

    def factory() -> ChannelLayer:
        from channels_redis.core import RedisChannelLayer

        layer: ChannelLayer = RedisChannelLayer(
            hosts=[redis_url], capacity=CAPACITY, expiry=EXPIRY_S
        )
        return layer

    return Target("channels_redis", lambda note: contextlib.nullcontext(factory), is_ours=False)


def backend_names(urls: Sequence[str]) -> list[str]:
    # "broker (memory)" reads best; the full URL only where two backends share a scheme.
    schemes = [urlsplit(url).scheme for url in urls]
    return [
        f"broker ({scheme if schemes.count(scheme) == 1 else url})"
        for scheme, url in zip(schemes, urls, strict=True)
    ]


def build_targets(
    backends: Sequence[str], addresses: Sequence[str], redis_url: str, note: Note
) -> list[Target]:
    """Ours first (a daemon per backend, then running daemons), then the references."""
    targets = [
        daemon_target(n, url) for n, url in zip(backend_names(backends), backends, strict=True)
    ]
    targets += [running_target(address) for address in addresses]
    reference = channels_redis_target(redis_url, note)
    targets += [] if reference is None else [reference]
    postgres = [url for url in backends if urlsplit(url).scheme in ("postgresql", "postgres")]
    if postgres:  # the same database for channels_postgres, in a schema of its own
        from .postgres import channels_postgres_target

        if (pg_reference := channels_postgres_target(postgres[0], note)) is not None:
            targets.append(pg_reference)
    return targets


def progress(text: str) -> None:
    click.echo(f"bench: {text}", err=True)


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


def ratio_pairs(targets: Sequence[Target]) -> list[tuple[str, str, str]]:
    """(ours, theirs, column label) for each of our targets against each reference."""
    ours = [t.name for t in targets if t.is_ours]
    theirs = [t.name for t in targets if not t.is_ours]
    # With one daemon, "broker/channels_redis" says it all; with several, name each.
    return [(a, b, f"{a if len(ours) > 1 else 'broker'}/{b}") for a in ours for b in theirs]


def ratio(row: Row, ours: float | None, theirs: float | None) -> float | None:
    """Oriented so that above 1 means ours is better: theirs/ours for latencies."""
    if not ours or not theirs:
        return None
    return ours / theirs if row.is_higher_better else theirs / ours


def table_row(
    row: Row, index: int, outcomes: dict[str, Outcome], pairs: Sequence[tuple[str, str, str]]
) -> dict[str, Any]:
    """One row as the JSON output has it; the text table is drawn from these."""
    values = {name: o.values[index] if o.values else None for name, o in outcomes.items()}
    verified = {name: o.error is None for name, o in outcomes.items()}
    # A ratio against a number that failed verification would compare unlike things.
    sound = {name: value if verified[name] else None for name, value in values.items()}
    return {
        "metric": row.label,
        "unit": row.unit,
        "higher_is_better": row.is_higher_better,
        "values": values,
        "verified": verified,
        "ratios": {label: ratio(row, sound[a], sound[b]) for a, b, label in pairs},
    }


def table_rows(
    scenarios: Sequence[Scenario], targets: Sequence[Target], results: Results
) -> list[dict[str, Any]]:
    pairs = ratio_pairs(targets)
    return [
        {"scenario": scenario.name}
        | table_row(row, index, {t.name: results[t.name][scenario.name] for t in targets}, pairs)
        for scenario in scenarios
        for index, row in enumerate(scenario.rows)
    ]


def command_line() -> str:
    # ``python -m broker`` leaves the path of __main__.py in argv[0]; show what was typed.
    if sys.argv[0].endswith("__main__.py"):
        return shlex.join([sys.executable, "-m", "broker", *sys.argv[1:]])
    return shlex.join(sys.argv)


def machine() -> dict[str, Any]:
    versions = {}
    for label, distribution in VERSIONS_SHOWN:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[label] = importlib.metadata.version(distribution)
    return {
        "cpus": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        # Other work on the machine skews the numbers; taken before the run, the load
        # average says whether there was any.
        "load_1min": round(os.getloadavg()[0], 2),
        "versions": versions,
    }


def sizes(scale: float) -> dict[str, int]:
    return {
        "ping_pong_exchanges": scaled(PING_PONG_EXCHANGES, scale),
        "ping_pong_warmup": scaled(PING_PONG_WARMUP, scale),
        "stream_messages": scaled(STREAM_MESSAGES, scale),
        "worker_messages": scaled(WORKER_MESSAGES, scale),
        "fanout_group_sends": scaled(FANOUT_SENDS, scale),
        "sync_calls": scaled(SYNC_CALLS, scale),
    }


def format_value(value: float | None, is_verified: bool) -> str:
    if value is None:
        return "error"
    text = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return text if is_verified else f"{text}!"


def text_table(rows: Sequence[dict[str, Any]], targets: Sequence[Target]) -> list[str]:
    names = [t.name for t in targets]
    pairs = [label for _, _, label in ratio_pairs(targets)]
    header = ["metric", *names, *pairs]
    body = [
        [f"{row['metric']} ({row['unit']})"]
        + [format_value(row["values"][name], row["verified"][name]) for name in names]
        + [("-" if (r := row["ratios"][pair]) is None else f"{r:.2f}x") for pair in pairs]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return [
        "  ".join(
            [line[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        )
        for line in [header, *body]
    ]


def text_report(report: dict[str, Any], targets: Sequence[Target]) -> str:
    info = report["machine"]
    versions = ", ".join(f"{name} {v}" for name, v in info["versions"].items())
    lines = [
        f"command: {report['command']}",
        f"machine: {info['cpus']} CPUs (load {info['load_1min']} before the run), {info['python']},"
        f" {info['platform']}; {versions}",
        "sizes: " + ", ".join(f"{k}={v}" for k, v in report["sizes"].items()),
        f"scale: {report['scale']}; ratio > 1 means broker is better (latency: theirs/ours);"
        " '!' marks a value that failed verification",
        "",
        *text_table(report["rows"], targets),
        "",
    ]
    lines += [f"note: {text}" for text in report["notes"]]
    lines += [f"error: {e['target']} / {e['scenario']}: {e['error']}" for e in report["errors"]]
    return "\n".join(lines)


@click.command()
@click.option(
    "--backend",
    "backends",
    multiple=True,
    metavar="URL",
    help=f"Start a daemon on this backend and measure it; repeatable. [default: {DEFAULT_BACKEND}"
    " unless --target is given]",
)
@click.option(
    "--target",
    "addresses",
    multiple=True,
    metavar="URL",
    help="Measure a running daemon (tcp://host:port) instead; repeatable. Its data is flushed.",
)
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=DEFAULT_REDIS_URL,
    show_default=True,
    help="The Redis for the channels_redis column (env REDIS_URL).",
)
@click.option(
    "--scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Multiplier on message and call counts; 0.1 for a quick run.",
)
@click.option(
    "--scenario",
    "scenario_names",
    multiple=True,
    type=click.Choice([s.name for s in SCENARIOS]),
    help="Run only this scenario; repeatable. [default: all]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
def bench(
    backends: tuple[str, ...],
    addresses: tuple[str, ...],
    redis_url: str,
    scale: float,
    scenario_names: tuple[str, ...],
    as_json: bool,
) -> None:
    """Measure channel layers side by side: our daemon per backend, and channels_redis.

    Exits with 1 if a scenario failed or did not verify on one of our targets; the
    references' failures (channels_redis repeats messages among workers) are findings.
    """
    info = machine()
    notes: list[str] = []
    chosen = [s for s in SCENARIOS if not scenario_names or s.name in scenario_names]
    if not backends and not addresses:
        backends = (DEFAULT_BACKEND,)
    targets = build_targets(backends, addresses, redis_url, notes.append)
    results = {t.name: run_target(t, chosen, scale, notes.append) for t in targets}
    errors = [
        {"target": target, "scenario": scenario, "error": outcome.error}
        for target, outcomes in results.items()
        for scenario, outcome in outcomes.items()
        if outcome.error is not None
    ]
    report = {
        "command": command_line(),
        "machine": info,
        "scale": scale,
        "sizes": sizes(scale),
        "targets": [t.name for t in targets],
        "rows": table_rows(chosen, targets, results),
        "notes": notes,
        "errors": errors,
    }
    click.echo(json.dumps(report, indent=2) if as_json else text_report(report, targets))
    ours = {t.name for t in targets if t.is_ours}
    if any(error["target"] in ours for error in errors):
        raise click.exceptions.Exit(1)
