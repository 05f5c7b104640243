"""The runner's lingering private view: one FUSE daemon per (user, store), shared by that
user's ``jbl run`` jobs, which unmounts itself N seconds after the last job released it.

Everything lives in ``views_dir()``, the user's own 0700 directory beside the mount records
(root: ``/run/jbl/views``; a user: ``$XDG_RUNTIME_DIR/jbl/views``, else
``~/.local/state/jbl/views``), per store key ``K`` (sha256 of the store's real path)::

    K.lock     flock EX: held by a job while it looks for, recovers or starts the view, and
               by the daemon from the moment it decides to exit until the process is gone
    K.hold     flock SH: held by every job that uses the view, for the job's lifetime;
               its mtime is the last time a job took or released it (jobs touch it)
    K.current  the mountpoint of the view last started (a pointer; the mount record says
               whether it still lives)
    K-XXXXXX/  that mountpoint (mkdtemp: 0700), removed by its daemon when it exits

and the daemon removes all four when it exits with nobody holding or looking for its view
(``IdleWatch.forget``), so nothing of a view outlives it.

Why this is race-free: a job reads ``K.current`` and takes its SH hold while it holds
``K.lock``; the daemon decides to exit only while it holds ``K.lock`` *and* an EX lock on
``K.hold`` (both non-blocking), and keeps both until it has unmounted and exited. So a job
either finds the view before the daemon decided (and its SH hold then keeps the daemon up)
or after the daemon is gone. A dead job's locks die with its descriptors: a SIGKILLed
``jbl run`` cannot keep the view up beyond one linger after its last touch.

Each of these is opened without following links and without blocking (``O_NOFOLLOW |
O_NONBLOCK``) and must be a regular file of ours (``fstat``); ``K.current`` is read through
fusefs/trust.py. Anything else in their place (a FIFO, a link, someone else's file) makes the
job fall back to a view of its own, never hang or follow it.

The daemon never blocks on these locks (its request loop answers FUSE requests that a job
holding ``K.lock`` may be waiting for, e.g. ``stat`` of the mount).

Thread-safety: ``IdleWatch`` belongs to the daemon thread that serves requests; the rest are
plain functions for the caller's main thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jbl.store.settings import DEFAULT_VIEW_LINGER

from . import trust
from .mounttab import records_dir

ENV = "JBL_VIEW_LINGER"
DEFAULT_LINGER = DEFAULT_VIEW_LINGER  # seconds a view outlives its last job (one place)


def linger_seconds() -> float:
    """The linger when the caller passes none; the CLI passes ``JBL_VIEW_LINGER``
    (parsed once by store/settings.py: ``Settings.view_linger``)."""
    return DEFAULT_LINGER


@dataclass(frozen=True)
class ViewFiles:
    dir: Path
    key: str

    @property
    def lock(self) -> Path:
        return self.dir / f"{self.key}.lock"

    @property
    def hold(self) -> Path:
        return self.dir / f"{self.key}.hold"

    @property
    def current(self) -> Path:
        return self.dir / f"{self.key}.current"


def views_dir() -> Path | None:
    """This user's views directory (created 0700), or None if it cannot be made safe (no
    home, someone else's, writable by others): then jobs get a view each, as before."""
    d = records_dir().parent / "views"
    fd = trust.own_dir(d)
    if fd is None:
        return None
    os.close(fd)
    return Path(os.path.realpath(d))


def view_files(store_dir: Path) -> ViewFiles | None:
    d = views_dir()
    if d is None:
        return None
    return ViewFiles(d, hashlib.sha256(os.fsencode(store_dir)).hexdigest()[:16])


def _open(path: Path) -> int:
    """An fd on our own regular file ``path`` (created if missing). O_NOFOLLOW|O_NONBLOCK:
    the directory is ours and 0700, but never follow or wait on what was planted there."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(errno.EPERM, "not a regular file of ours", str(path))
    return fd


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold ``K.lock`` (EX, blocking: the holder is a job starting a view, or a daemon
    unmounting itself; both are short). A daemon that exits removes ``K.lock`` while it
    holds it (``IdleWatch.forget``): a lock won on a file no longer at ``path`` is no lock,
    so take it again on the file that is there now."""
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now = os.stat(path, follow_symlinks=False)
                current = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def take_hold(files: ViewFiles) -> int:
    """Take a job's SH hold on the view (call under ``locked``); returns the fd to pass to
    ``release_hold``. Close-on-exec, and the runner's forked helper closes every fd >= 3,
    so the job itself never holds it."""
    fd = _open(files.hold)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.utime(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_hold(fd: int) -> None:
    """The job is over: mark the time (the daemon's linger starts here) and let go."""
    with contextlib.suppress(OSError):
        os.utime(fd)
    os.close(fd)


def read_current(files: ViewFiles) -> Path | None:
    dfd = trust.owned_dir(files.dir, os.geteuid())
    if dfd is None:
        return None
    try:
        data = trust.read_small(dfd, files.current.name, os.geteuid(), limit=8192)
    finally:
        os.close(dfd)
    try:
        text = (data or b"").decode().strip()
    except UnicodeDecodeError:
        return None
    if not text.startswith("/") or "\0" in text:
        return None
    p = Path(text)
    # only a mountpoint we made: a child of our own views directory with our key
    if p.parent != files.dir or not p.name.startswith(files.key + "-"):
        return None
    return p


def last_used() -> Path | None:
    """The mountpoint of this user's view a job let go of last (the newest ``K.hold``), as
    ``read_current`` gives it; None if there is none. A hint for what to prepare ahead
    (runner/warmview.py): whatever it names is checked like any ``K.current``."""
    d = views_dir()
    if d is None:
        return None
    dfd = trust.owned_dir(d, os.geteuid())
    if dfd is None:
        return None
    try:
        newest: tuple[float, str] | None = None
        for name in trust.names(dfd, "", ".hold"):
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and (newest is None or st.st_mtime > newest[0]):
                    newest = (st.st_mtime, name.removesuffix(".hold"))
    finally:
        os.close(dfd)
    return None if newest is None else read_current(ViewFiles(d, newest[1]))


def write_current(files: ViewFiles, mountpoint: Path) -> None:
    tmp = files.dir / f".{files.key}.current.{os.getpid()}"
    tmp.write_text(f"{mountpoint}\n")
    os.replace(tmp, files.current)


class IdleWatch:
    """The daemon's side: ``expired()`` is called periodically from its request loop and
    returns True once no job has held the view for ``seconds``; from then on this process
    holds ``K.lock`` and ``K.hold`` until it exits (see the module docstring)."""

    def __init__(self, lock: Path, hold: Path, seconds: float) -> None:
        self.seconds = seconds
        self.lock = lock
        self.lock_fd = _open(lock)
        self.hold_fd = _open(hold)
        self.done = False

    @staticmethod
    def _try(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def idle_for(self) -> float | None:
        """Seconds since the last job let go, or None while a job holds the view."""
        if not self._try(self.hold_fd):
            return None
        try:
            return time.time() - os.fstat(self.hold_fd).st_mtime
        finally:
            fcntl.flock(self.hold_fd, fcntl.LOCK_UN)

    def expired(self) -> bool:
        if self.done:
            return True
        idle = self.idle_for()
        if idle is None or idle < self.seconds:
            return False
        if not self._try(self.lock_fd):  # a job is looking for the view right now
            return False
        # one took its hold just before, or took and released it since idle_for()
        if not self._try(self.hold_fd) or \
                time.time() - os.fstat(self.hold_fd).st_mtime < self.seconds:
            fcntl.flock(self.hold_fd, fcntl.LOCK_UN)
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            return False
        self.done = True  # both locks stay ours until the process exits
        return True

    def forget(self, mountpoint: Path) -> None:
        """At exit, once unmounted: remove this view's ``K.current``, ``K.hold`` and
        ``K.lock``, so the views directory keeps nothing of a view that is gone. Only with
        both locks held (the daemon decided to exit, or nobody holds or looks for the view
        now); otherwise a job is at it and the files are still in use. ``K.lock`` goes last:
        a job blocked on it finds it removed and takes the new one (``locked``)."""
        if not self.done:
            if not self._try(self.lock_fd):
                return
            if not self._try(self.hold_fd):
                return  # a job holds the view (we were stopped): it keeps its files
        files = ViewFiles(self.lock.parent, self.lock.name.removesuffix(".lock"))
        names = [files.hold, files.lock]
        if read_current(files) == mountpoint:
            names.insert(0, files.current)
        for p in names:
            with contextlib.suppress(OSError):
                os.unlink(p)
