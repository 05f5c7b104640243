"""fusefs/trust.own_dir: the one maker and opener of a process's own 0700 state directory
(the lingering views', the launcher's). Real directories, links and owners; no mocks."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from jbl.fusefs.trust import own_dir

OTHER_UID = 4321  # someone else (no such user is needed to own a directory)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """Under /run (root's, 0755), not /tmp: /tmp is writable by all, so nothing below it can
    be trusted (rightly refused by own_dir)."""
    d = Path(tempfile.mkdtemp(prefix="jbl-own-dir-", dir="/run"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def _same(fd: int | None, p: Path) -> bool:
    assert fd is not None
    try:
        st, want = os.fstat(fd), os.lstat(p)
        return (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino)
    finally:
        os.close(fd)


def test_made_if_missing_with_its_parents(run_dir: Path) -> None:
    base = run_dir / "base"
    base.mkdir(mode=0o755)
    d = base / "a" / "b" / "views"
    old = os.umask(0o077)  # parents get exactly the mode asked for, whatever the umask
    try:
        assert _same(own_dir(d, 0o711), d)
    finally:
        os.umask(old)
    assert (_mode(d), _mode(d.parent), _mode(d.parent.parent)) == (0o700, 0o711, 0o711)
    assert _same(own_dir(d), d)  # the second time: found as it is


def test_ours_but_opened_up_is_closed_again(run_dir: Path) -> None:
    d = run_dir / "views"
    d.mkdir()
    d.chmod(0o777)
    assert _same(own_dir(d), d)
    assert _mode(d) == 0o700


def test_a_link_in_its_place_is_refused_and_its_target_untouched(run_dir: Path) -> None:
    target = run_dir / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    d = run_dir / "views"
    d.symlink_to(target)
    assert own_dir(d) is None
    assert _mode(target) == 0o755 and d.is_symlink()


def test_someone_elses_directory_is_refused(run_dir: Path) -> None:
    d = run_dir / "views"
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, -1)
    assert own_dir(d) is None


def test_a_parent_others_may_write_is_refused(run_dir: Path) -> None:
    parent = run_dir / "shared"
    parent.mkdir()
    parent.chmod(0o777)  # anyone could swap the directory below it
    assert own_dir(parent / "views") is None
    d = run_dir / "file"
    d.write_text("")  # not a directory at all
    assert own_dir(d) is None
