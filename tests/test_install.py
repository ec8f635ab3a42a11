"""Installs as README says: ``make dist`` builds a wheel that installs into a fresh venv,
where ``channels-broker`` runs; ``make run`` installs what the daemon needs and no more.

The wheel's install resolves its dependencies as a user's would: from the package index
(or pip's cache). ``make dist`` builds with the venv's own hatchling (the ``dist`` extra,
which ``make test`` installs), so it downloads nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Building (2 s) and installing the wheel and its dependencies (5-10 s from pip's cache).
INSTALL_TIMEOUT_S = 300


def make(*args: str) -> subprocess.CompletedProcess[str]:
    """``make *args`` in the checkout, with the venv running these tests as its venv."""
    if shutil.which("make") is None:
        pytest.fail("make is needed: apt-get install make", pytrace=False)
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), f"VENV={sys.prefix}", *args],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )


@pytest.mark.slow
@pytest.mark.timeout(2 * INSTALL_TIMEOUT_S)
def test_make_dist_builds_a_wheel_that_installs_and_runs_in_a_fresh_venv(
    tmp_path: Path,
) -> None:
    """1. ``make dist`` into a temporary directory: one sdist and one wheel.
    2. A fresh venv installs the wheel (with its dependencies, not the test extra).
    3. Its ``channels-broker --help`` and ``serve --help`` run, from outside the checkout."""
    built = make("dist", f"DIST={tmp_path / 'dist'}")
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = sorted((tmp_path / "dist").glob("channels_broker-*-py3-none-any.whl"))
    assert len(wheels) == 1 and len(list((tmp_path / "dist").glob("*.tar.gz"))) == 1
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
        + ["install", "--quiet", str(wheels[0])],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert installed.returncode == 0, installed.stderr
    for args in (["--help"], ["serve", "--help"]):
        ran = subprocess.run(
            [str(venv / "bin" / "channels-broker"), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
    assert "--max-message-bytes" in ran.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import broker, importlib.util as u;"
         " print(broker.__file__, u.find_spec('channels'), u.find_spec('pytest'))"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert Path(where[0]).is_relative_to(venv), "the wheel's code, not the checkout's"
    assert where[1:] == ["None", "None"], "the daemon's install carries no Django, no tests"


def test_make_run_installs_the_daemon_without_the_test_extra(tmp_path: Path) -> None:
    """What ``make run`` would do in a checkout without a venv: install the package
    alone (its runtime dependencies), then serve."""
    planned = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(ROOT), "run", f"VENV={tmp_path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installs = [line for line in planned.splitlines() if " pip install " in line]
    assert installs[-1].endswith("pip install --quiet -e ."), planned
    assert "[test" not in planned
    assert planned.rstrip().splitlines()[-1].startswith(f"{tmp_path}/bin/channels-broker serve")
