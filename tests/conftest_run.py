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


_USER_JBL: str | None = None


def user_jbl() -> str:
    """A ``jbl`` an unprivileged user can execute. The venv's interpreter may live under
    /root (pyenv, mode 0700); then use the system python3.11 with the venv's site-packages."""
    global _USER_JBL
    if _USER_JBL is None:
        real = os.path.realpath(VENV_BIN / "python")
        if all(os.stat(p).st_mode & 0o001 for p in _parents(real)):
            _USER_JBL = JBL
        else:
            site = next((VENV_BIN.parent / "lib").glob("python3.*/site-packages"))
            d = Path(tempfile.mkdtemp(prefix="jbl-userbin-"))
            d.chmod(0o755)
            shim = d / "jbl"
            shim.write_text(f"#!/usr/bin/python3.11\nimport site\nsite.addsitedir({str(site)!r})\n"
                            "from jbl.cli.main import entry\nentry()\n")
            shim.chmod(0o755)
            _USER_JBL = str(shim)
    return _USER_JBL


def _parents(path: str) -> list[str]:
    out = []
    p = Path(path)
    while p != p.parent:
        p = p.parent
        out.append(str(p))
    return out


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
