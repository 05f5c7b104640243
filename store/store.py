"""The store as one object: its directory layout, index, blobs, locks and leases.

    STORE/index.db        the SQLite index (schema.py)
    STORE/blobs/xx/yyyy…  content-addressed blob files (blobs.py)
    STORE/blobs/tmp/      blobs being written
    STORE/lock            flock: installs hold it SHARED while writing blobs and committing;
                          gc/rm sweeps hold it EXCLUSIVE while deleting rows and unlinking
                          files. So a sweep never races a half-done install (docs/concurrency.md).
                          Mode 0660 like the index: only those who may write the store can
                          open it, so no one else can hold it (flock ignores the mode).
    STORE/public/         the summary users who may not open the index read (snapshot.py);
                          refreshed when a Store that changed the index closes.
    STORE/cache/          fetched registry indexes (registry.py)
    STORE/run/            mount.log, the mount daemons' log (fusefs/mounttab.py)

Thread-safety: a Store wraps one apsw connection; use it from one thread at a time, and open
another Store per thread/process that needs one.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import storepath
from . import versions as versions_mod
from .blobs import BlobStore
from .db import DB, INDEX_MODE, open_db
from .errors import NotInstalled, StoreBusy, StoreError
from .versions import Spec, parse_spec

_VERSION_COLS = ("id, name, version, description, manifest, root_id, state, source, checksum, "
                 "file_count, logical_size, installed_at, last_used_at, pinned")


@dataclass(frozen=True)
class VersionInfo:
    id: int
    name: str
    version: str
    description: str
    manifest_text: str
    root_id: int
    state: str
    source: str
    checksum: str
    file_count: int
    logical_size: int
    installed_at: float
    last_used_at: float | None
    pinned: bool

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> VersionInfo:
        # The columns of _VERSION_COLS, in field order; pinned is stored as 0/1.
        (id_, name, version, description, manifest_text, root_id, state, source, checksum,
         file_count, logical_size, installed_at, last_used_at, pinned) = row[:14]
        return cls(id_, name, version, description, manifest_text, root_id, state, source,
                   checksum, file_count, logical_size, installed_at, last_used_at, bool(pinned))


def proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: distinguishes a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])


def pid_alive(pid: int, start: int) -> bool:
    return proc_starttime(pid) == start


class Store:
    def __init__(self, store_dir: Path, db: DB, readonly: bool) -> None:
        self.dir = Path(store_dir)
        self.db = db
        self.readonly = readonly
        self.blobs = BlobStore(self.dir)
        self.chunk_size = int(db.scalar("SELECT value FROM meta WHERE key='chunk_size'"))
        self._dir_id = storepath.identity(self.dir)  # close() never recreates a removed store

    @classmethod
    def open(cls, store_dir: Path | str, *, readonly: bool = False,
             create: bool = False, action: str | None = None) -> Store:
        store_dir = Path(store_dir)
        if not readonly:
            # Root, the owner of a private store, or the admin group of a shared one; everyone
            # else stops here with one line (exit 8) before anything is written (access.py).
            # ``action`` names the change in that line (the CLI's Settings.action).
            from .access import require_admin

            require_admin(action, store_dir)
        if create:
            storepath.make_dir(store_dir)  # /proc, read-only, a file...: one line each
            try:
                BlobStore(store_dir).create()
            except OSError as e:
                raise storepath.from_oserror(e, store_dir, "create") from None
        db = open_db(store_dir, readonly=readonly, create=create)
        return cls(store_dir, db, readonly)

    def close(self) -> None:
        try:
            if not self.readonly and self.db.changed and \
                    storepath.identity(self.dir) == self._dir_id:
                self.publish()
        finally:
            self.db.close()

    def publish(self) -> bool:
        """Refresh the published summary (snapshot.py) now; True if it changed. A failure is
        a warning: the change itself is committed, users see it after the next refresh."""
        from .snapshot import publish

        try:
            changed = publish(self)
        except Exception as e:  # the change is committed: never report it as failed
            logging.getLogger("jbl").warning(
                "the public summary of %s was not refreshed (%s: %s); users who are not admins "
                "see the previous state until the next change", self.dir, type(e).__name__, e,
                exc_info=logging.getLogger("jbl").isEnabledFor(logging.DEBUG))
            return False
        self.db.changed = False
        return changed

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- versions -----------------------------------------------------------------------
    def versions(self, name: str | None = None, *, state: str = "installed") -> list[VersionInfo]:
        sql = f"SELECT {_VERSION_COLS} FROM versions WHERE state=?"
        params: tuple[Any, ...] = (state,)
        if name is not None:
            sql += " AND name=?"
            params += (name,)
        rows = [VersionInfo.from_row(r) for r in self.db.query(sql, params)]
        order = {v: i for i, v in enumerate(versions_mod.sort_versions(r.version for r in rows))}
        return sorted(rows, key=lambda r: (r.name, order[r.version]))

    def get_version(self, name: str, version: str) -> VersionInfo | None:
        row = self.db.one(f"SELECT {_VERSION_COLS} FROM versions WHERE name=? AND version=? "
                          "AND state='installed'", (name, version))
        return VersionInfo.from_row(row) if row else None

    def version_by_id(self, version_id: int) -> VersionInfo | None:
        row = self.db.one(f"SELECT {_VERSION_COLS} FROM versions WHERE id=?", (version_id,))
        return VersionInfo.from_row(row) if row else None

    def resolve_installed(self, spec: str | Spec) -> VersionInfo:
        """The installed version ``spec`` names (``NAME``, ``NAME@latest``, ``NAME@1.3``)."""
        s = parse_spec(spec) if isinstance(spec, str) else spec
        have = [v.version for v in self.versions(s.name)]
        if not have:
            raise NotInstalled(f"runtime {s} is not installed",
                               hint=f"install it with: jbl store install {s}")
        try:
            chosen = versions_mod.select(s, have, where="installed")
        except NotInstalled:
            raise
        except Exception as e:
            raise NotInstalled(str(e), hint=f"install it with: jbl store install {s}") from None
        info = self.get_version(s.name, chosen)
        assert info is not None
        return info

    # --- locks --------------------------------------------------------------------------
    @contextmanager
    def _flock(self, mode: int, blocking: bool, what: str) -> Iterator[None]:
        # Read-only is enough for flock; O_NOFOLLOW | O_NONBLOCK: a planted link or FIFO is
        # refused, never followed or waited on.
        try:
            fd = os.open(self.dir / "lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, INDEX_MODE)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise StoreError(f"{self.dir / 'lock'} is a symbolic link; not following it",
                             hint="an admin should remove it; jbl recreates it") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{self.dir / 'lock'} is not a regular file",
                                 hint="an admin should remove it; jbl recreates it")
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != INDEX_MODE:
                os.fchmod(fd, INDEX_MODE)  # a new lock file: exact mode whatever the umask
            try:
                fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                raise StoreBusy(f"{what}: the store is busy (an install or gc is running)",
                                hint="try again later") from None
            yield
        finally:
            os.close(fd)

    def install_lock(self) -> AbstractContextManager[None]:
        """SHARED: many installs at once; excludes a sweep."""
        return self._flock(fcntl.LOCK_SH, True, "install")

    def sweep_lock(self, blocking: bool = True) -> AbstractContextManager[None]:
        """EXCLUSIVE: no install is writing blobs or committing while this is held."""
        return self._flock(fcntl.LOCK_EX, blocking, "gc")

    # --- leases (gc roots held by live processes) ---------------------------------------
    @contextmanager
    def lease(self, version_id: int, kind: str, pid: int | None = None) -> Iterator[int]:
        """Record a live user of a version for the block's duration; also marks last use."""
        pid = os.getpid() if pid is None else pid
        start = proc_starttime(pid) or 0
        now = time.time()
        with self.db.write(public=False):
            self.db.execute("INSERT INTO leases(version_id, kind, pid, pid_start, created_at) "
                            "VALUES (?, ?, ?, ?, ?)", (version_id, kind, pid, start, now))
            lease_id = self.db.conn.last_insert_rowid()
            self.db.execute("UPDATE versions SET last_used_at=? WHERE id=?", (now, version_id))
            if self.db.conn.changes() == 0:  # removed (by rm/gc) since the caller looked it up
                raise NotInstalled(f"runtime version {version_id} was just removed",
                                   hint="try again: another version may be current now")
        try:
            yield lease_id
        finally:
            with self.db.write(public=False):
                self.db.execute("DELETE FROM leases WHERE id=?", (lease_id,))

    def note_holder(self, lease_id: int, uid: int, pid: int) -> None:
        """Record who a mount saw using the version of its lease (schema v2 columns)."""
        with self.db.write():
            self.db.execute("UPDATE leases SET holder_uid=?, holder_pid=? WHERE id=?",
                            (uid, pid, lease_id))

    def removed_holders(self) -> list[tuple[str, str, float, str, int, int | None, int | None]]:
        """Removed versions still held by a live lease: (name, version, removed_at, kind,
        holder pid, requester uid, requester pid) -- the requester as the mount saw it, None
        when unknown (a job's own lease, or an index not yet at schema v2, read-only)."""
        import apsw

        sql = ("SELECT v.name, v.version, v.removed_at, l.kind, l.pid, l.pid_start, {} "
               "FROM leases l JOIN versions v ON v.id = l.version_id "
               "WHERE v.state = 'removed' ORDER BY v.name, v.version, l.id")
        try:
            rows = self.db.query(sql.format("l.holder_uid, l.holder_pid"))
        except apsw.SQLError:  # no such column: a v1 index opened read-only
            rows = self.db.query(sql.format("NULL, NULL"))
        return [(r[0], r[1], r[2] or 0.0, r[3], r[4], r[6], r[7]) for r in rows
                if pid_alive(r[4], r[5])]

    def live_leases(self) -> list[tuple[int, int, str, int]]:
        """(lease id, version id, kind, pid) of leases whose holder still runs."""
        rows = self.db.query("SELECT id, version_id, kind, pid, pid_start FROM leases")
        return [(r[0], r[1], r[2], r[3]) for r in rows if pid_alive(r[3], r[4])]
