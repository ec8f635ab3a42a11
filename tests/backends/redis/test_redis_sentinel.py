"""The storage contract once more, through Redis Sentinel (a master and one Sentinel).

The same test bodies as ``test_backend_contract``; only the backend URL differs. Sentinel
is not in ``BACKEND_URLS`` because every layer test would then run a fourth time for
what differs only in how the master's address is found.
"""

from __future__ import annotations

import pytest

from tests import servers
from tests.backends.test_backend_contract import *  # noqa: F403  (the contract's test functions)

#: For ``backends(...)`` markers: this module's storage is shared.
BACKEND_KIND = "shared"


@pytest.fixture
def backend_url() -> str:
    """This module's backend: a throwaway master found through a throwaway Sentinel."""
    return servers.backend_url("redis+sentinel://")
