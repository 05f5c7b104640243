"""What a jbl process may believe of the small files other processes leave for it: mount
records (fusefs/mounttab.py) and the lingering view's files (fusefs/linger.py).

    owned_dir(path, uid)        an fd on ``path`` if every component of it is a real directory
                                owned by ``uid`` or root that no one else may write, else None
    own_dir(path)               an fd on a 0700 directory of our own (made if missing), with
                                the same rule above it, else None: the state directories
                                (the views', fusefs/linger.py; the launcher's)
    make_dirs(path, mode)       ``mkdir -p`` giving each directory it makes exactly ``mode``
    read_small(dfd, name, uid)  the bytes of ``name`` in that directory if it is a regular file
                                owned by ``uid`` of at most ``LIMIT`` bytes, else None
    names(dfd, prefix, suffix)  the matching names in it (at most ``MAX_NAMES`` looked at)
    within(seconds, fn)         ``fn()`` on a helper thread, None if it has not returned in time

Why each rule (issue 10: root's ``jbl run`` once ran a user's trojan runtime, and hung in
``open()`` on a FIFO with TERM/INT blocked):

* A record is only as trustworthy as the directory it lies in: if anyone but its user (or
  root) may write a component, anyone may replace the record. The path is resolved once
  (realpath), then walked again component by component with ``O_NOFOLLOW``, so a link swapped
  in between is refused rather than followed.
* Every file is looked at (``lstat`` relative to the directory fd) before it is opened, and
  opened with ``O_NOFOLLOW | O_NONBLOCK``: a symlink, FIFO, socket or device is never opened,
  and a FIFO swapped in between the two never blocks. ``fstat`` then checks it is the same
  regular file, owned by the record's user, and small; reads stop at ``LIMIT``.
* A directory on someone's FUSE mount could leave a ``stat`` waiting for an answer that never
  comes (uninterruptible once the daemon has read the request): callers walking another
  user's paths do it through ``within``, which gives up after a deadline and leaves the
  stuck thread behind (it dies with the process).

Thread-safety: plain functions over fds; any thread.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

LIMIT = 64 << 10       # bytes: a record is a few hundred
MAX_NAMES = 4096       # directory entries looked at: a user cannot make root list forever
T = TypeVar("T")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _safe(st: os.stat_result, uid: int) -> bool:
    return (stat.S_ISDIR(st.st_mode) and st.st_uid in (uid, 0)
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def owned_dir(path: os.PathLike[str] | str, uid: int) -> int | None:
    """An O_RDONLY fd on the directory ``path`` (the caller closes it), or None when it is
    missing or any component of its real path is not a directory owned by ``uid`` or root
    and writable by its owner only."""
    real = os.path.realpath(path)
    parts = [p for p in real.split("/") if p]
    try:
        fd = os.open("/", _DIR_FLAGS)
    except OSError:
        return None
    try:
        if not _safe(os.fstat(fd), uid):
            os.close(fd)
            return None
        for part in parts:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if not _safe(os.fstat(fd), uid):
                os.close(fd)
                return None
        return fd
    except OSError:  # missing, a link, not a directory, not ours to read
        os.close(fd)
        return None


def make_dirs(d: Path, mode: int = 0o755) -> None:
    """``mkdir -p`` giving each directory it creates exactly ``mode`` (not what the umask
    leaves): a group-writable component would make every record below it untrusted."""
    missing = []
    p = d
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=mode)
            os.chmod(p, mode)


def own_dir(path: Path, parents_mode: int = 0o755) -> int | None:
    """An O_RDONLY fd on ``path`` (the caller closes it): a directory of this process's user,
    mode 0700, made if missing (its missing parents with ``parents_mode``). None if it cannot
    be had safely: it, or a component above it, is a link, not a directory, or someone
    else's, or a component above it is writable by others (``owned_dir``'s rule).

    It is opened relative to its checked parent with ``O_NOFOLLOW`` and its mode put right
    through that fd (ours, but opened up by hand or an older jbl): nothing is done through a
    path a link could be swapped into."""
    uid = os.geteuid()
    try:
        make_dirs(path.parent, parents_mode)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    except OSError:
        return None
    parent = owned_dir(path.parent, uid)
    if parent is None:
        return None
    try:
        fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
    except OSError:  # a link, not a directory, removed meanwhile
        return None
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        if st.st_uid == uid:
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o700)
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def read_small(dir_fd: int, name: str, uid: int, limit: int = LIMIT) -> bytes | None:
    """The content of the regular file ``name`` in ``dir_fd`` owned by ``uid``; None for
    anything else (missing, a link, a FIFO, a device, someone else's, over ``limit``)."""
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(before.st_mode) or before.st_uid != uid or before.st_size > limit:
            return None
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_size > limit
                or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino)):
            return None
        chunks, left = [], limit + 1
        while left > 0:
            b = os.read(fd, left)
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        return data if len(data) <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def names(dir_fd: int, prefix: str, suffix: str) -> list[str]:
    """Sorted names in the directory starting with ``prefix`` and ending with ``suffix``."""
    out = []
    try:
        with os.scandir(dir_fd) as it:
            for i, e in enumerate(it):
                if i >= MAX_NAMES:
                    break
                if e.name.startswith(prefix) and e.name.endswith(suffix):
                    out.append(e.name)
    except OSError:
        pass
    return sorted(out)


def within(seconds: float, fn: Callable[[], T]) -> T | None:
    """``fn()``, or None if it raised or has not returned within ``seconds`` (the thread is
    left to finish or to die with the process: see the module docstring)."""
    box: list[T] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append(fn())
        except Exception:  # noqa: S110 - an unreadable place is simply not believed
            pass
        finally:
            done.set()

    threading.Thread(target=run, name="jbl-trust", daemon=True).start()
    done.wait(seconds)
    return box[0] if box else None
