"""Fixtures for the backend tests: one test body, run against every backend URL.

The URLs are ``backend_url``'s, from ``tests/conftest.py`` (one list for the whole
suite). An ``async def`` test that takes a ``Backend`` runs here in its own
``asyncio.run``: every ``Backend`` among its arguments is connected in that loop first,
then flushed (the test's namespace) and closed after, pass or fail. Other async tests
fall through to the ``pytest_pyfunc_call`` of ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from backends import Backend, backend_from_url

AsyncTest = Callable[..., Coroutine[Any, Any, None]]


@pytest.fixture
def ns() -> str:
    """A namespace of this test's own, so a shared storage needs no global flush."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def backend(backend_url: str) -> Backend:
    """A backend for ``backend_url``; an async test receives it connected."""
    return backend_from_url(backend_url)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests that take a backend in a fresh event loop each."""
    test = pyfuncitem.obj
    if not inspect.iscoroutinefunction(test):
        return None
    names = inspect.signature(test).parameters
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    if not any(isinstance(value, Backend) for value in kwargs.values()):
        return None
    asyncio.run(_run_connected(test, kwargs))
    return True


async def _run_connected(test: AsyncTest, kwargs: dict[str, Any]) -> None:
    backends = [value for value in kwargs.values() if isinstance(value, Backend)]
    for backend in backends:
        await backend.connect()
    try:
        await test(**kwargs)
    finally:
        for backend in backends:
            if "ns" in kwargs:
                await backend.flush(kwargs["ns"])
            await backend.close()
