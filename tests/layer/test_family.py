"""The identities a layer mints (broker.layer.identity): one family per layer and process."""

from __future__ import annotations

import subprocess
import sys

from broker.layer.identity import Family
from protocol import family_of, proves
from tests.conftest import REPO_ROOT

#: A process that mints in a family, forks, and mints again in the child: the two
#: families it prints must differ (the parent's is printed twice, before and after).
_FORK_SCRIPT = """
import os
from broker.layer.identity import Family
from protocol import family_of
family = Family()
print(family_of(family.mint().client_id), flush=True)
pid = os.fork()
if pid == 0:
    print(family_of(family.mint().client_id), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print(family_of(family.mint().client_id), flush=True)
"""


def test_ids_of_one_layer_share_a_family_and_another_layer_has_its_own() -> None:
    family, stranger = Family(), Family()
    identities = [family.mint() for _ in range(5)]
    assert len({identity.client_id for identity in identities}) == 5
    assert len({family_of(identity.client_id) for identity in identities}) == 1
    assert all(proves(identity.secret, identity.client_id) for identity in identities)
    assert family_of(stranger.mint().client_id) != family_of(identities[0].client_id)
    assert identities[0].secret.hex() not in repr(identities[0])


def test_a_forked_process_mints_in_a_family_of_its_own() -> None:
    """Workers forked from one parent cannot pull each other's channels."""
    result = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    before, child, after = result.stdout.split()
    assert before == after
    assert child != before
