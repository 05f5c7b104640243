"""Fixtures for the view and mount tests: tarballs, imports, real mounts, a second user.

``import_tarball`` installs with the real ``jbl store import``, so the view and the mount are
tested on real runtime trees exactly as users get them.

Every mount made here is unmounted in ``finally``; ``sweep_mounts`` (session, autouse where
imported) detaches any jbl mount left under the test temp dirs.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import run_jbl
from jbl.fusefs import mounttab
from rtbuild import build_runtime

OTHER_USER = "jbltest2"


def make_tarball(rtdir: Path, out: Path) -> Path:
    """A gzip tarball of a runtime directory, members ``./runtime.yml``, ``./isolated/...``."""
    subprocess.run(["tar", "--format=posix", "--numeric-owner", "--sort=name",
                    "--pax-option=delete=atime,delete=ctime", "-C", str(rtdir), "-czf", str(out),
                    "."], check=True)
    return out


def import_tarball(store_dir: Path, tarball: Path) -> None:
    """Install ``tarball`` with the real ``jbl store import`` (never a test-only importer:
    a broken import must fail these tests, not be routed around)."""
    run_jbl("store", "import", tarball, store=store_dir).ok()


def build_rt(name: str, version: str, tmp_path_factory: pytest.TempPathFactory,
             extra: dict[str, bytes] | None = None) -> Path:
    """A runtime dir of our own (conftest's rt_factory reuses one directory name when called
    twice with ``extra`` for the same name and version)."""
    return build_runtime(tmp_path_factory.mktemp("rt") / f"{name}-{version}", name, version,
                         extra=extra)


ENGINES = ["raw", "pyfuse3"]  # the tests of shared behaviour run on both (docs/mount.md)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The mount engine under test (``jbl mount --engine``)."""
    return str(request.param)


@contextlib.contextmanager
def mounted(store_dir: Path, mp: Path, *extra: str, engine: str | None = None
            ) -> Iterator[Path]:
    mp.mkdir(parents=True, exist_ok=True)
    if engine is not None:
        extra = (*extra, "--engine", engine)
    run_jbl("mount", mp, *extra, store=store_dir).ok()
    try:
        yield mp
    finally:
        r = run_jbl("umount", mp, store=store_dir)
        if mounttab.mount_fstype(mp) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
            raise AssertionError(f"jbl umount left {mp} mounted: {r.err}")


@pytest.fixture(scope="session", autouse=True)
def sweep_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Only this session's temp dirs: other pytest sessions on the host (other engineers)
    # have live mounts under their own /tmp/pytest-of-*/pytest-N. Private views
    # (/tmp/jbl-view-*) unmount themselves when their parent dies.
    base = str(tmp_path_factory.getbasetemp()) + "/"
    yield
    for mp in mounttab.jbl_mounts():
        if mp.startswith(base):
            subprocess.run(["fusermount3", "-u", "-z", mp], check=False)


@pytest.fixture(scope="session")
def other_user() -> str:
    """An unprivileged second user (created once; kept for later runs)."""
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", OTHER_USER],
                       check=True)
    return OTHER_USER


@pytest.fixture(scope="session")
def pyrt_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pyrt@1.0.0 as a tarball, with a multi-chunk file, hardlinks and an empty file added."""
    big = bytes(range(256)) * 4096 * 3 + os.urandom(300_000)  # 3 MiB + incompressible tail
    rt = build_rt("pyrt", "1.0.0", tmp_path_factory, extra={
        "data/big.bin": big, "data/empty": b"", "data/secret.txt": b"only root\n"})
    os.chmod(rt / "isolated/data/secret.txt", 0o600)
    link = rt / "isolated/data/big-link.bin"
    if not link.exists():
        os.link(rt / "isolated/data/big.bin", link)
    out = tmp_path_factory.mktemp("tarballs") / "pyrt-1.0.0.tar.gz"
    return make_tarball(rt, out)


def wait_until(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.1) -> bool:
    """Poll ``cond`` until it is true or ``timeout`` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False
