"""Fixtures for the ``jbl run`` tests (imported by tests/test_run_*.py; not a conftest).

Runtimes are built once per session from the host's interpreter (``rtbuild``) in a
world-readable directory, so unprivileged test users can run jobs in them too.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from rtbuild import build_runtime

VENV_BIN = Path(sys.executable).parent
JBL = str(VENV_BIN / "jbl")
TEST_USER = "jbl-run-test"


def jbl(*args: str, input: str | None = None, timeout: float = 60,
        user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``jbl`` CLI (as ``user`` via runuser when given)."""
    cmd = [JBL, *args] if user is None else ["runuser", "-u", user, "--", user_jbl(), *args]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)


def user_jbl() -> str:
    """The ``jbl`` an unprivileged user runs: the system-wide install (``make install``),
    refreshed from this clone once per session by ``fixtures_users.installed_jbl``."""
    from fixtures_users import installed_jbl

    return installed_jbl()


@pytest.fixture(scope="session")
def runtimes() -> Iterator[dict[str, Path]]:
    """Two versions of one runtime: {'1.0.0': dir, '2.0.0': dir}."""
    base = Path(tempfile.mkdtemp(prefix="jbl-run-rt-"))
    base.chmod(0o755)
    out = {v: build_runtime(base / v, "pyrt", v) for v in ("1.0.0", "2.0.0")}
    yield out
    shutil.rmtree(base)


@pytest.fixture(scope="session")
def rt(runtimes: dict[str, Path]) -> str:
    return str(runtimes["1.0.0"])


@pytest.fixture(scope="session")
def test_user() -> str:
    if os.geteuid() != 0:
        pytest.skip("creating a test user needs root")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", TEST_USER],
                       check=True)
    return TEST_USER


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory outside pytest's 0700 tmp tree, for volumes and uploads."""
    d = Path(tempfile.mkdtemp(prefix="jbl-run-share-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def host_pids_with(marker: str) -> list[int]:
    """Host processes whose command line contains ``marker``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if marker.encode() in cmd:
                out.append(int(d))
    return out
