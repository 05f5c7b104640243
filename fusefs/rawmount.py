"""Mounting /dev/fuse ourselves, and serving a store with the raw engine (``rawfs.py``).

    fuse_mount(mp, allow_other)   -> fd: as root mount(2) directly; otherwise through
                                     ``fusermount3`` (setuid), which hands the fd back over
                                     a socketpair (``_FUSE_COMMFD``, SCM_RIGHTS)
    RawEngine                      the raw engine as ``mount.serve`` (the serve skeleton)
                                   runs it: mount, the request loop, close

The mount is ``fuse.jbl`` with source ``mounttab.fs_source(store)`` (how discovery checks that
a mount serves the store its record names), MS_RDONLY |
MS_NOSUID | MS_NODEV, ``default_permissions`` (the kernel checks modes), ``allow_other`` on
request.

Thread-safety: ``RawEngine.run`` runs in its process's main thread (the signal wakeup pipe).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from jbl.store.errors import MountError

if TYPE_CHECKING:
    from jbl.store.store import Store

    from .stop import Stop

log = logging.getLogger("jbl.fusefs")

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4


def fuse_mount(mountpoint: Path, allow_other: bool, source: str = "jbl") -> int:
    """Mount a new FUSE connection on ``mountpoint``; return its /dev/fuse fd."""
    mp = os.fsencode(mountpoint)
    if os.geteuid() == 0:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = (f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},"
                "default_permissions" + (",allow_other" if allow_other else ""))
        libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library forks ldconfig
        if libc.mount(os.fsencode(source), mp, b"fuse.jbl", MS_RDONLY | MS_NOSUID | MS_NODEV,
                      opts.encode()) != 0:
            e = ctypes.get_errno()
            os.close(fd)
            raise MountError(f"cannot mount {mountpoint}: mount(2): {os.strerror(e)}")
        return fd
    # fusermount3 (not root): these imports here, off the start of a root daemon (~3 ms)
    import socket
    import subprocess

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = f"ro,nosuid,nodev,default_permissions,fsname={source},subtype=jbl"
        if allow_other:
            opts += ",allow_other"
        r = subprocess.run(["fusermount3", "-o", opts, "--", os.fsdecode(mp)],
                           env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
                           pass_fds=(theirs.fileno(),), capture_output=True, text=True)
        theirs.close()
        if r.returncode != 0:
            why = r.stderr.strip() or f"fusermount3 failed ({r.returncode})"
            hint = ("users need read-write access to /dev/fuse (distributions make it mode "
                    "0666)" if "/dev/fuse" in why else None)
            raise MountError(f"cannot mount {mountpoint}: {why}", hint=hint)
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        if not fds:
            raise MountError(f"cannot mount {mountpoint}: fusermount3 sent no descriptor")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()
        with contextlib.suppress(OSError):
            theirs.close()


class RawEngine:
    """The raw engine for the serve skeleton (``mount.serve``): mounts /dev/fuse itself and
    runs ``RawFS``'s request loop; the skeleton's ``Stop`` is checked once per tick, and a
    signal wakes the loop at once (a wakeup pipe the loop polls)."""

    name = "raw"

    def __init__(self, store: Store, store_dir: Path, hold_limit: float | None) -> None:
        from jbl.store.view import View

        from .rawfs import RawFS

        self.store_dir = store_dir
        self.hold_limit = hold_limit
        self.fs = RawFS(View(store), -1)
        self.stats = self.fs.stats
        self.mountpoint: Path | None = None

    def busy(self) -> dict[str, int]:
        c = self.fs.view.cache
        return {**self.fs.busy_ns, **self.fs.view.spent_ns, "cache_hits": c.hits,
                "cache_misses": c.misses, "cache_bytes": c.bytes}

    def mount(self, mountpoint: Path, allow_other: bool, source: str) -> None:
        from .leases import ThreadLeaseKeeper

        self.fs.fd = fuse_mount(mountpoint, allow_other, source)
        self.mountpoint = mountpoint
        self.fs.leases = ThreadLeaseKeeper(self.store_dir, hold_limit=self.hold_limit)

    def run(self, stop: Stop, ready: Callable[[], None]) -> None:
        fs = self.fs
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(w)  # a signal makes the loop's poll return

        def wake() -> None:
            fs.stopping = True

        def tick() -> None:
            if stop.check():
                fs.stopping = True

        stop.wake.append(wake)
        fs.tick = tick
        try:
            ready()
            fs.stopping = stop.check()  # a signal before the wake callback was in place
            fs.serve_forever(wakeup_fd=r)
        finally:
            stop.wake.remove(wake)
            signal.set_wakeup_fd(old_wakeup)
            os.close(r)
            os.close(w)

    def close(self, unmount: bool) -> None:
        from .mounttab import force_unmount

        if unmount and self.mountpoint is not None:
            with contextlib.suppress(Exception):
                force_unmount(self.mountpoint)
        if self.fs.leases is not None:
            self.fs.leases.stop()
        if self.fs.fd >= 0:
            os.close(self.fs.fd)
