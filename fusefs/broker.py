"""The runner's view broker: how ``jbl run`` finds or starts the view it runs a job in.

    view_root(store)    a directory with <name>/<version>/ for the runner: a live `jbl mount`
                        of that store by this user or root (``mounttab.usable_views``: never
                        another user's), else the user's lingering private view of it
                        (fusefs/linger.py), else a private daemon for the caller's lifetime;
                        MountError for a user who may not read the store itself (a shared
                        store whose `jbl mount` service is down)

    view_started(store) the same, but a daemon this job starts is waited for only at
                        ``View.ready()``: its start-up overlaps the job's own preparation
    learn(store)        what a launcher's job process finds out about that view ahead of
                        its request (runner/warm.py): a ``Known`` that ``view_root`` then
                        trusts only after ``Known.still`` proved, for this job, that it is
                        the same live mount and that no record of a shared mount of the
                        store (which would be preferred) has come since

Daemons are started with ``mount.spawn`` and found through the mount table
(fusefs/mounttab.py); this module only decides which view a job gets.

Thread-safety: the runner's main thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from jbl.store.errors import MountError
from jbl.store.settings import REMOVED_HOLD_LIMIT

from . import linger as lingermod
from . import trust
from .mount import DEFAULT_ENGINE, READY_TIMEOUT, STOP_TIMEOUT, spawn, start
from .mounttab import (
    FSTYPE,
    MountStatus,
    daemon_running,
    force_unmount,
    is_stale,
    mount_fstype,
    parse_record,
    usable_views,
)
from .mounttab import _dirs_of as record_dirs  # where usable_views reads records
from .mounttab import find as find_record

log = logging.getLogger("jbl.fusefs")


Records = frozenset[tuple[str, int]]  # (name, inode) of a records directory's mount-*.json


def _identity(path: Path) -> tuple[int, ...] | None:
    """What changes when ``path`` is replaced, or its owner or mode changed; None if it is
    missing."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_uid)


def _listing(d: Path) -> Records | None:
    """The records in ``d`` by name and inode (a record rewritten is a new inode: records
    are renamed into place); empty if ``d`` is missing, None if it cannot be listed or is
    too long to (``trust.MAX_NAMES``)."""
    out = []
    try:
        with os.scandir(d) as it:
            for i, e in enumerate(it):
                if i >= trust.MAX_NAMES:
                    return None
                if e.name.startswith("mount-") and e.name.endswith(".json"):
                    out.append((e.name, e.inode()))
    except FileNotFoundError:
        return frozenset()
    except OSError:
        return None
    return frozenset(out)


def _may_serve(d: Path, uid: int, name: str, store_dir: Path) -> bool:
    """Could the record ``name`` (new in ``d``, a directory of ``uid``) be a shared mount of
    ``store_dir``? Read as ``mounttab`` reads records (fusefs/trust.py); one that cannot be
    believed serves nothing."""
    dfd = trust.owned_dir(d, uid)
    if dfd is None:
        return False
    try:
        data = trust.read_small(dfd, name, uid)
    finally:
        os.close(dfd)
    st = parse_record(data) if data is not None else None
    return st is not None and not st.private and st.store == str(store_dir)


def _records_dirs() -> tuple[tuple[Path, int, Records], ...] | None:
    """Every directory ``usable_views`` reads records from, its user and its records; None
    if one cannot be listed."""
    out = []
    for uid in dict.fromkeys([0, os.geteuid()]):
        for d in record_dirs(uid):
            seen = _listing(d)
            if seen is None:
                return None
            out.append((d, uid, seen))
    return tuple(out)


@dataclass(frozen=True)
class Known:
    """A view found ahead of a job (``learn``): a shared ``jbl mount`` (``view`` None) or
    this user's lingering view (its files). A hint only: ``still`` decides, per job."""

    store: Path  # real path
    mountpoint: Path
    dev: int  # st_dev of the mount's root
    record: Path  # its daemon's record, and that file's identity
    record_id: tuple[int, ...]
    pid: int
    pid_start: int
    dirs: tuple[tuple[Path, int, Records], ...]  # every records directory: its user, records
    view: lingermod.ViewFiles | None = None
    views_id: tuple[int, ...] | None = None  # the views directory's identity

    def still(self) -> bool:
        """Is it still the view ``view_root`` would find? The same mount (its root's device)
        served by the same daemon (pid and start time, running, answering), recorded by the
        same record file, and no record come since that could be a shared mount of this
        store (it would be preferred). A listing of the records directories and a few
        ``stat`` calls instead of every record and mountinfo parsed again."""
        for d, uid, seen in self.dirs:
            now = _listing(d)
            if now is None or any(_may_serve(d, uid, name, self.store)
                                  for name, _ino in now - seen):
                return False
        if _record_id(self.record) != self.record_id:
            return False
        if not daemon_running(self.pid, self.pid_start):
            return False
        try:
            os.statvfs(self.mountpoint)  # reaches the daemon (mounttab._probe)
            return os.stat(self.mountpoint).st_dev == self.dev
        except OSError:
            return False


def learn(store_dir: Path | str) -> Known | None:
    """The view ``view_root(store_dir)`` would use now, found without holding it, or None
    (none yet, or nothing stable enough to know)."""
    store_dir = Path(os.path.realpath(store_dir))
    dirs = _records_dirs()  # before the records are read: a later change shows
    if dirs is None:
        return None
    view: lingermod.ViewFiles | None = None
    views_id = None
    found = usable_views(store_dir)
    if found:
        rec = find_record(found[0].mountpoint)  # the same, with its record's path
        if rec is None or rec[1].mountpoint != found[0].mountpoint:
            return None
        path, st = rec
    else:
        view = lingermod.view_files(store_dir)
        mp = lingermod.read_current(view) if view is not None else None
        rec = find_record(mp) if mp is not None else None
        if view is None or rec is None or not _lingering(rec[1], store_dir):
            return None
        path, st = rec
        views_id = _identity(view.dir)  # its files are checked per job
    record_id = _record_id(path)
    try:
        dev = os.stat(st.mountpoint).st_dev
    except OSError:
        return None
    if record_id is None or f"{os.major(dev)}:{os.minor(dev)}" != st.dev:
        return None
    return Known(store_dir, Path(st.mountpoint), dev, path, record_id, st.pid, st.pid_start,
                 dirs, view, views_id)


def _record_id(path: Path) -> tuple[int, ...] | None:
    """A record file's identity: replaced (renamed over) or rewritten, it changes."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _lingering(st: MountStatus, store_dir: Path) -> bool:
    """A live lingering view of ``store_dir`` by this user (find_record checked the mount
    against mountinfo: our uid, this store's source)."""
    return (st.alive and st.private and st.linger > 0 and st.uid == os.geteuid()
            and st.store == str(store_dir))


@contextlib.contextmanager
def view_root(store_dir: Path | str, *, timeout: float = READY_TIMEOUT,
              engine: str | None = None, linger: float | None = None,
              hold_limit: float | None = REMOVED_HOLD_LIMIT,
              known: Known | None = None) -> Iterator[Path]:
    """A directory holding ``<name>/<version>/`` for every installed version of the store.

    Reuses a live ``jbl mount`` of this store; otherwise this user's lingering private view
    of it (fusefs/linger.py: started if need be, held for the block, unmounted by itself
    ``linger`` seconds after its last job; the CLI passes ``JBL_VIEW_LINGER``, else 60 s); with
    ``linger`` 0, or no safe directory for it, a daemon mounted for this block alone that
    unmounts when it exits, is interrupted, or this process dies. The caller still takes
    ``store.lease(version_id, "job")`` for the version it uses. ``hold_limit``: the
    private view's ``removed_hold_limit`` (the CLI passes the configured one). ``known``:
    what ``learn`` found ahead, used only if ``Known.still`` holds (a lingering view: once
    this job holds it)."""
    with view_started(store_dir, timeout=timeout, engine=engine, linger=linger,
                      hold_limit=hold_limit, known=known) as view:
        view.ready()
        yield view.root


class View:
    """``view_started``'s view: ``root`` holds ``<name>/<version>/`` once ``ready()`` has
    returned (at once, unless this job is starting the lingering view's daemon)."""

    def __init__(self, root: Path, pending: Callable[[], None] | None = None) -> None:
        self.root = root
        self._pending = pending

    def ready(self) -> None:
        """Wait for the daemon this job started to be mounted (MountError if it failed)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()


@contextlib.contextmanager
def view_started(store_dir: Path | str, *, timeout: float = READY_TIMEOUT,
                 engine: str | None = None, linger: float | None = None,
                 hold_limit: float | None = REMOVED_HOLD_LIMIT,
                 known: Known | None = None) -> Iterator[View]:
    """``view_root`` whose caller waits for a starting daemon itself (``View.ready``), so
    the daemon's start overlaps the job's own preparation. Until then this job holds
    ``K.lock`` (as while it waits in ``view_root``): a job coming meanwhile waits for the
    view instead of taking its half-made mountpoint for a dead one. A block left without
    ``ready()`` still waits (errors aside) before it lets go."""
    store_dir = Path(os.path.realpath(store_dir))
    secs = lingermod.linger_seconds() if linger is None else linger
    got = _known(known, store_dir, secs) if known is not None else None
    if got is not None:
        fd, mp = got
        try:
            yield View(mp)
        finally:
            if fd is not None:
                lingermod.release_hold(fd)
        return
    for st in usable_views(store_dir):
        yield View(Path(st.mountpoint))
        return
    from jbl.store.access import may_open_index

    if not may_open_index(store_dir):
        # A view of our own would mount, then fail on the first file: the blobs are the
        # admins' (2770). What the user needs to know is that the shared view is down.
        raise MountError(f"the shared view of the store {store_dir} is not running (no "
                         "`jbl mount --allow-other` of it), and only root and the store's "
                         "admin group may read the store directly",
                         hint="ask an admin to start it: systemctl start jbl-mount.service "
                              "(made by `jbl setup --system`)")
    engine = engine or DEFAULT_ENGINE  # the CLI passes JBL_MOUNT_ENGINE (its settings)
    view = lingermod.view_files(store_dir) if secs > 0 else None
    if view is not None:
        try:
            hold = _lingering_view(store_dir, view, secs, engine, timeout, hold_limit)
        except OSError as e:  # e.g. something not ours planted as K.lock (linger.py)
            log.warning("lingering view of %s unusable (%s); using a view for this job",
                        store_dir, e)
            hold = None
        if hold is not None:
            fd, mp, pending = hold
            started = View(mp, pending)
            try:
                yield started
            finally:
                with contextlib.suppress(Exception):
                    started.ready()  # never leave K.lock held, nor a start unwaited
                lingermod.release_hold(fd)
            return
    with _job_view(store_dir, engine, timeout, hold_limit) as mp:
        yield View(mp)


def _known(known: Known, store_dir: Path, secs: float) -> tuple[int | None, Path] | None:
    """``known``'s view for this job, if ``Known.still`` holds: (hold fd or None for a shared
    mount, mountpoint); None sends the job down the full path of ``view_root``."""
    if known.store != store_dir:
        return None
    if known.view is None:
        return (None, known.mountpoint) if known.still() else None
    from jbl.store.access import may_open_index

    if secs <= 0 or _identity(known.view.dir) != known.views_id or \
            not may_open_index(store_dir):
        return None
    try:
        with lingermod.locked(known.view.lock):  # as _lingering_view: the hold, then the look
            fd = lingermod.take_hold(known.view)
            try:
                if lingermod.read_current(known.view) == known.mountpoint and known.still():
                    return fd, known.mountpoint
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
    except OSError:
        pass  # the full path says why, and falls back
    return None


def _lingering_view(store_dir: Path, view: lingermod.ViewFiles, secs: float, engine: str,
                    timeout: float, hold_limit: float | None,
                    ) -> tuple[int, Path, Callable[[], None] | None] | None:
    """Find or start this user's lingering view of ``store_dir`` and take a hold on it:
    (hold fd, mountpoint, None), or with a daemon this job started, (…, its wait: it lets
    ``K.lock`` go once the mount is up); None when it cannot be used (a daemon that hangs)."""
    with contextlib.ExitStack() as lock:
        lock.enter_context(lingermod.locked(view.lock))
        fd = lingermod.take_hold(view)  # from here on no daemon of this view decides to exit
        try:
            old = lingermod.read_current(view)
            if old is not None:
                found = find_record(old)
                if found is not None and _lingering(found[1], store_dir):
                    return fd, old, None
                if not _recover(old, found):
                    os.close(fd)
                    return None  # unusable and busy: fall back to a view for this job
            mp = Path(tempfile.mkdtemp(prefix=view.key + "-", dir=view.dir))
            # the pointer first: killed after the spawn, we leave no daemon nobody can find
            lingermod.write_current(view, mp)
            try:
                starting = start(store_dir, mp, allow_other=os.geteuid() == 0, private=True,
                                 timeout=timeout, engine=engine, linger=secs, view=view,
                                 hold_limit=hold_limit)
            except BaseException:
                with contextlib.suppress(OSError):
                    mp.rmdir()
                raise
            locked = lock.pop_all()

            def ready() -> None:
                with locked:
                    try:
                        starting.wait()
                    except BaseException:
                        with contextlib.suppress(OSError):
                            mp.rmdir()
                        raise

            return fd, mp, ready
        except BaseException:
            os.close(fd)
            raise


def _recover(mp: Path, found: tuple[Path, MountStatus] | None) -> bool:
    """Clean up a previous lingering view that is no longer usable (its daemon died, its
    mount was detached): True when nothing of it is left in the way."""
    if mount_fstype(mp) == FSTYPE:
        if not is_stale(mp):
            log.warning("%s: a jbl mount that is not a usable view; using a view per job", mp)
            return False
        log.warning("%s: stale lingering view (its daemon died); detaching it", mp)
        force_unmount(mp)
    if found is not None:
        with contextlib.suppress(OSError):
            found[0].unlink()
    with contextlib.suppress(OSError):
        mp.rmdir()
    return True


@contextlib.contextmanager
def _job_view(store_dir: Path, engine: str, timeout: float,
              hold_limit: float | None) -> Iterator[Path]:
    """A private daemon for this block only (``JBL_VIEW_LINGER=0``)."""
    mp = Path(tempfile.mkdtemp(prefix="jbl-view-"))
    try:
        proc = spawn(store_dir, mp, allow_other=os.geteuid() == 0, private=True,
                     timeout=timeout, engine=engine, hold_limit=hold_limit)
        try:
            yield mp
        finally:
            proc.terminate()  # the daemon unmounts on SIGTERM; reap it (it is our child)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if mount_fstype(mp) == FSTYPE:
                force_unmount(mp)
    finally:
        with contextlib.suppress(OSError):
            mp.rmdir()
