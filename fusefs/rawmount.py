"""Mounting /dev/fuse ourselves, and serving a store with the raw engine (``rawfs.py``).

    fuse_mount(mp, allow_other)   -> fd: as root mount(2) directly; otherwise through
                                     ``fusermount3`` (setuid), which hands the fd back over
                                     a socketpair (``_FUSE_COMMFD``, SCM_RIGHTS)
    serve_raw(...)                 the raw engine's counterpart of ``mount.serve``

The mount is ``fuse.jbl`` with source ``mounttab.fs_source(store)`` (how discovery checks that
a mount serves the store its record names), MS_RDONLY |
MS_NOSUID | MS_NODEV, ``default_permissions`` (the kernel checks modes), ``allow_other`` on
request.

Thread-safety: ``serve_raw`` owns its process's main thread (signal handlers live there).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from jbl.store.errors import MountError

if TYPE_CHECKING:
    from jbl.store.store import Store

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


def serve_raw(store_dir: Path, mountpoint: Path, *, allow_other: bool,
              ready: Callable[[str | None], None] | None, private: bool,
              parent_pid: int | None, store: Store,
              started: Callable[[], Callable[[], None]],
              idle: Callable[[], bool] | None = None,
              hold_limit: float | None = None) -> None:
    """Mount with the raw engine and serve until SIGTERM/SIGINT/SIGHUP, unmount, the
    death of ``parent_pid``, or ``idle()`` saying so (checked once per tick: the lingering
    view, fusefs/linger.py). ``started()`` (mount.py: status file) is called once mounted
    and returns the cleanup to run at the end."""
    from jbl.store.view import View

    from .leases import ThreadLeaseKeeper
    from .mounttab import force_unmount, fs_source, mount_at
    from .rawfs import RawFS

    try:
        fs = RawFS(View(store), -1)
        fs.fd = fuse_mount(mountpoint, allow_other, fs_source(store_dir))
    except Exception as e:
        store.close()
        if ready:
            ready(str(e))
        raise
    fd = fs.fd
    our_dev = (mount_at(mountpoint) or ("", ""))[1]
    leases = fs.leases = ThreadLeaseKeeper(store_dir, hold_limit=hold_limit)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(w)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: unmounting", signum)
        fs.stopping = True

    def dump(_signum: int, _frame: object) -> None:
        log.info("requests so far: %s", fs.stats)  # `kill -USR1 PID`: what reached us

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, dump)
    if parent_pid is not None:
        def watch_parent() -> None:
            # No event fires when a parent dies (PDEATHSIG follows the parent *thread*): poll.
            if os.getppid() != parent_pid:
                log.info("parent %d exited: unmounting the private view", parent_pid)
                fs.stopping = True
        fs.tick = watch_parent
    elif idle is not None:
        def watch_idle() -> None:
            if idle():
                log.info("no job holds the lingering view any more: unmounting")
                fs.stopping = True
        fs.tick = watch_idle
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    try:
        cleanup = started()
        log.info("mounted %s on %s (pid %d, raw engine)", store_dir, mountpoint, os.getpid())
        if ready:
            ready(None)
        fs.serve_forever(wakeup_fd=r)
        log.info("unmounting %s", mountpoint)
    except BaseException:
        log.exception("the request loop failed; unmounting %s", mountpoint)
        raise
    finally:
        # Unmount only if the mount at the path is still ours: after a lazy detach someone
        # may have mounted a new daemon there.
        if (mount_at(mountpoint) or ("", ""))[1] == our_dev:
            with contextlib.suppress(Exception):
                force_unmount(mountpoint)
        leases.stop()
        os.close(fd)
        signal.set_wakeup_fd(old_wakeup)
        for sig, h in old.items():
            signal.signal(sig, h)
        os.close(r)
        os.close(w)
        cleanup()
        store.close()
        log.info("stopped; served %s", fs.stats)
