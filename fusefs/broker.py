"""The runner's view broker: how ``jbl run`` finds or starts the view it runs a job in.

    view_root(store)    a directory with <name>/<version>/ for the runner: a live `jbl mount`
                        of that store by this user or root (``mounttab.usable_views``: never
                        another user's), else the user's lingering private view of it
                        (fusefs/linger.py), else a private daemon for the caller's lifetime;
                        MountError for a user who may not read the store itself (a shared
                        store whose `jbl mount` service is down)

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
from collections.abc import Iterator
from pathlib import Path

from jbl.store.errors import MountError
from jbl.store.settings import REMOVED_HOLD_LIMIT

from . import linger as lingermod
from .mount import DEFAULT_ENGINE, READY_TIMEOUT, STOP_TIMEOUT, spawn
from .mounttab import FSTYPE, MountStatus, force_unmount, is_stale, mount_fstype, usable_views
from .mounttab import find as find_record

log = logging.getLogger("jbl.fusefs")


@contextlib.contextmanager
def view_root(store_dir: Path | str, *, timeout: float = READY_TIMEOUT,
              engine: str | None = None, linger: float | None = None,
              hold_limit: float | None = REMOVED_HOLD_LIMIT) -> Iterator[Path]:
    """A directory holding ``<name>/<version>/`` for every installed version of the store.

    Reuses a live ``jbl mount`` of this store; otherwise this user's lingering private view
    of it (fusefs/linger.py: started if need be, held for the block, unmounted by itself
    ``linger`` seconds after its last job; the CLI passes ``JBL_VIEW_LINGER``, else 60 s); with
    ``linger`` 0, or no safe directory for it, a daemon mounted for this block alone that
    unmounts when it exits, is interrupted, or this process dies. The caller still takes
    ``store.lease(version_id, "job")`` for the version it uses. ``hold_limit``: the
    private view's ``removed_hold_limit`` (the CLI passes the configured one)."""
    store_dir = Path(os.path.realpath(store_dir))
    for st in usable_views(store_dir):
        yield Path(st.mountpoint)
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
    secs = lingermod.linger_seconds() if linger is None else linger
    view = lingermod.view_files(store_dir) if secs > 0 else None
    if view is not None:
        try:
            hold = _lingering_view(store_dir, view, secs, engine, timeout, hold_limit)
        except OSError as e:  # e.g. something not ours planted as K.lock (linger.py)
            log.warning("lingering view of %s unusable (%s); using a view for this job",
                        store_dir, e)
            hold = None
        if hold is not None:
            fd, mp = hold
            try:
                yield mp
            finally:
                lingermod.release_hold(fd)
            return
    with _job_view(store_dir, engine, timeout, hold_limit) as mp:
        yield mp


def _lingering_view(store_dir: Path, view: lingermod.ViewFiles, secs: float, engine: str,
                    timeout: float, hold_limit: float | None) -> tuple[int, Path] | None:
    """Find or start this user's lingering view of ``store_dir`` and take a hold on it:
    (hold fd, mountpoint), or None when it cannot be used (a daemon that hangs)."""
    with lingermod.locked(view.lock):
        fd = lingermod.take_hold(view)  # from here on no daemon of this view decides to exit
        try:
            old = lingermod.read_current(view)
            if old is not None:
                found = find_record(old)
                st = found[1] if found else None
                # find_record checked it against mountinfo (our uid, this store's source)
                if (st is not None and st.alive and st.private and st.linger > 0
                        and st.uid == os.geteuid() and st.store == str(store_dir)):
                    return fd, old
                if not _recover(old, found):
                    os.close(fd)
                    return None  # unusable and busy: fall back to a view for this job
            mp = Path(tempfile.mkdtemp(prefix=view.key + "-", dir=view.dir))
            # the pointer first: killed after the spawn, we leave no daemon nobody can find
            lingermod.write_current(view, mp)
            try:
                spawn(store_dir, mp, allow_other=os.geteuid() == 0, private=True,
                      timeout=timeout, engine=engine, linger=secs, view=view,
                      hold_limit=hold_limit)
            except BaseException:
                with contextlib.suppress(OSError):
                    mp.rmdir()
                raise
            return fd, mp
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
