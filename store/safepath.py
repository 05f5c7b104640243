"""Open a store path without following links: the one way root's jbl reaches into a store.

The store is group-writable: an admin-group member can put anything in it, including a
symbolic link to a root-only host file, a FIFO, or a directory link out of the store. Root's
commands (setup, gc, verify, repair, install, the mount daemon) must never act on such a
thing. So everything below the store directory is reached relative to directory fds, one
component at a time:

* directories with ``O_DIRECTORY|O_NOFOLLOW`` and files with ``O_NOFOLLOW|O_NONBLOCK`` (a
  planted FIFO cannot block us), each checked with ``fstat`` for the expected type;
* changes through fds or ``*at`` calls only (``fchown``/``fchmod``, ``unlinkat``,
  ``renameat``, ``linkat``), never by path: a name swapped for a link after a check is
  still never followed.

The store directory itself is root's own choice (``--store``, ``/var/lib/jbl``) in a parent
only root may change, so its path may contain links; nothing inside it may.

A violation raises ``UnsafeStorePath`` (exit 10) naming the item, what it is (e.g. "a
symbolic link to /etc/shadow, owned by uid 1001") and what to do.

Thread-safety: stateless functions over fds the caller owns; safe from any thread.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import UnsafeStorePath

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# What setup and the docs tell an admin who finds one of these errors.
FIX_HINT = "remove it; as root, `jbl setup --system` replaces such items"


def describe(dir_fd: int, name: str) -> str:
    """What ``name`` in ``dir_fd`` is, for a message: 'a symbolic link to X, owned by uid N'."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    what = {stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a directory",
            stat.S_IFREG: "a regular file", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
            stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"
            }.get(stat.S_IFMT(st.st_mode), "a special file")
    if stat.S_ISLNK(st.st_mode):
        with suppress(OSError):
            what += f" to {os.readlink(name, dir_fd=dir_fd)}"
    return f"{what}, owned by uid {st.st_uid}"


def _unsafe(dir_fd: int, name: str, shown: str, want: str) -> UnsafeStorePath:
    return UnsafeStorePath(f"{shown} is {describe(dir_fd, name)}, not {want}: refusing to "
                           "follow or use it", hint=FIX_HINT)


def open_store(store_dir: Path | str) -> int:
    """An fd of the store directory itself (its own path is trusted: see the docstring)."""
    fd = os.open(store_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return fd


def open_dir(dir_fd: int, name: str, *, shown: str | None = None,
             create_mode: int | None = None) -> int:
    """An fd of the real directory ``name`` in ``dir_fd`` (created with ``create_mode``
    when missing and a mode is given). Raises FileNotFoundError or UnsafeStorePath."""
    shown = shown or name
    for _attempt in range(2):
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if create_mode is None:
                raise
            with suppress(FileExistsError):  # a concurrent process (or a plant: open says)
                os.mkdir(name, create_mode, dir_fd=dir_fd)
            continue
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _unsafe(dir_fd, name, shown, "a directory") from None
            raise
        if not stat.S_ISDIR(os.fstat(fd).st_mode):  # O_DIRECTORY says so; belt and braces
            os.close(fd)
            raise _unsafe(dir_fd, name, shown, "a directory")
        return fd
    raise FileNotFoundError(errno.ENOENT, "vanished while being created", shown)


def walk(dir_fd: int, parts: list[str] | tuple[str, ...], *, shown: str = "",
         create_mode: int | None = None) -> int:
    """``open_dir`` component by component; returns the last fd (the caller closes it)."""
    fd = os.dup(dir_fd)
    try:
        for part in parts:
            shown = f"{shown}/{part}" if shown else part
            nxt = open_dir(fd, part, shown=shown, create_mode=create_mode)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(dir_fd: int, name: str, flags: int = os.O_RDONLY, mode: int = 0o644, *,
              shown: str | None = None) -> int:
    """An fd of the regular file ``name`` in ``dir_fd``: never a link, FIFO or device.
    ``flags`` adds access mode and e.g. ``O_CREAT``. Raises UnsafeStorePath or OSError."""
    try:
        fd = os.open(name, flags | FILE_FLAGS, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _unsafe(dir_fd, name, shown or name, "a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _unsafe(dir_fd, name, shown or name, "a regular file")
    return fd


def read_small(dir_fd: int, name: str, limit: int, *, shown: str | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (UnsafeStorePath if bigger)."""
    fd = open_file(dir_fd, name, shown=shown)
    try:
        data = bytearray()
        while len(data) <= limit and (block := os.read(fd, min(1 << 20, limit + 1 - len(data)))):
            data += block
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnsafeStorePath(f"{shown or name} has more than the {limit} bytes it may have: "
                              "refusing to read it", hint=FIX_HINT)
    return bytes(data)


def lstat(dir_fd: int, name: str) -> os.stat_result | None:
    """``fstatat(AT_SYMLINK_NOFOLLOW)``; None when ``name`` does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def unlink(dir_fd: int, name: str) -> bool:
    """``unlinkat``: removes a link itself, never what it points to. False if absent."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


@contextmanager
def opened(fd: int) -> Iterator[int]:
    """Close ``fd`` at the end of the block."""
    try:
        yield fd
    finally:
        os.close(fd)
