"""Opening the index: apsw connection settings, migrations, and a tiny query helper.

Thread-safety: an apsw ``Connection`` may be used from one thread at a time; each process
(and each long-lived thread that writes) opens its own. Writers serialise in SQLite itself
(``BEGIN IMMEDIATE`` + busy timeout); readers never block writers (WAL).

Busy: every statement runs here, and an ``apsw.BusyError`` that gets past the busy timeout
(or one SQLite raises without waiting) leaves this module as ``StoreBusy`` (``_busy``): one
line and exit 9 at the CLI, EAGAIN at the mount, never a raw apsw error.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw

from . import schema
from .errors import StoreBusy, StoreError, UnsafeStorePath

INDEX_NAME = "index.db"
Params = tuple[Any, ...] | dict[str, Any]  # bound parameters only, never string formatting
Row = tuple[Any, ...]

BUSY_TIMEOUT_MS = 60_000  # installs and gc hold the write lock for one short commit each
WAL_KEEP_BYTES = 4 << 20  # the persistent WAL is truncated to this after a checkpoint


def _busy(path: Path) -> StoreBusy:
    return StoreBusy(f"the store index {path} is locked by another jbl process (an install, "
                     "gc or mount); try again")


class DB:
    """A thin wrapper: ``query``/``one``/``scalar``/``execute`` with bound parameters only,
    ``write()`` for an immediate transaction."""

    def __init__(self, conn: apsw.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        # Set by a committed write the published summary must reflect (snapshot.py); the
        # Store refreshes the summary when it closes.
        self.changed = False

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        try:
            return list(self.conn.execute(sql, params))
        except apsw.BusyError:
            raise _busy(self.path) from None

    def iter(self, sql: str, params: Params = ()) -> Iterator[Row]:
        try:
            yield from self.conn.execute(sql, params)
        except apsw.BusyError:
            raise _busy(self.path) from None

    def one(self, sql: str, params: Params = ()) -> Row | None:
        row: Row
        try:
            for row in self.conn.execute(sql, params):
                return row
        except apsw.BusyError:
            raise _busy(self.path) from None
        return None

    def scalar(self, sql: str, params: Params = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else row[0]

    def execute(self, sql: str, params: Params = ()) -> None:
        try:
            self.conn.execute(sql, params)
        except apsw.BusyError:
            raise _busy(self.path) from None

    def executemany(self, sql: str, rows: Any) -> None:
        try:
            self.conn.executemany(sql, rows)
        except apsw.BusyError:
            raise _busy(self.path) from None

    @contextmanager
    def write(self, *, public: bool = True) -> Iterator[DB]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ROLLBACK on any exception).

        ``public=False`` for writes the published summary need not show at once (leases:
        the mount's lease worker must not pay for a refresh on a user's first ``ls``)."""
        self.execute("BEGIN IMMEDIATE")
        try:
            yield self
            self.execute("COMMIT")
            self.changed = self.changed or public
        except BaseException as e:
            if not self.conn.getautocommit():  # still in the transaction: undo it
                self.conn.execute("ROLLBACK")
            if isinstance(e, apsw.FullError):
                raise StoreError(f"no space left on the disk holding {self.path}; nothing "
                                 "was changed",
                                 hint="free space (jbl store gc) and retry") from None
            raise

    def close(self) -> None:
        self.conn.close()


def _configure(conn: apsw.Connection, readonly: bool) -> None:
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    # WAL: readers (the mount, `list`) never block the single writer and vice versa.
    if not readonly:
        _switch_to_wal(conn)
        # Keep `-wal` and `-shm` when the last writer closes (SQLite deletes them otherwise):
        # an admin-group member who may not write the store directory's files can open a WAL
        # index read-only only while both exist. SQLite creates them with the index's own
        # mode and owner (0660 root:jbl-admin, see create_index): nobody else may open them,
        # so nobody else can hold the locks writers need (docs/concurrency.md).
        # journal_size_limit trims the kept WAL after checkpoints.
        persist = ctypes.c_int(1)
        conn.file_control("main", apsw.SQLITE_FCNTL_PERSIST_WAL, ctypes.addressof(persist))
        conn.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
    # NORMAL in WAL is durable against process crashes and keeps the index consistent on
    # power loss (the last commits may roll back; blobs are fsync'd before their commit).
    conn.execute("PRAGMA synchronous=NORMAL")
    # We never rely on FK cascades; verify checks references. Enforced FKs would make gc's
    # row deletions order-sensitive for no gain.
    conn.execute("PRAGMA foreign_keys=OFF")
    # Lookups on the FUSE thread must stay microseconds: a generous page cache (64 MiB).
    conn.execute("PRAGMA cache_size=-65536")
    conn.execute("PRAGMA temp_store=MEMORY")
    # Memory-map the index for reads (256 MiB window): fewer syscalls per lookup.
    conn.execute("PRAGMA mmap_size=268435456")


def _switch_to_wal(conn: apsw.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, retried for as long as the busy timeout.

    On an index that is already WAL this only reads. On a new, empty one it writes the WAL
    mark into the header: a read that becomes a write inside one statement, which SQLite
    answers with BUSY at once, without the busy handler, when another process creating the
    same store holds the write lock for its own switch (two first installs at once). So we
    wait here instead; the other process's switch takes milliseconds."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except apsw.BusyError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _pragma_int(conn: apsw.Connection, name: str) -> int:
    """An integer PRAGMA (user_version, application_id) read as an int."""
    value = conn.execute(f"PRAGMA {name}").fetchall()[0][0]
    if not isinstance(value, int):  # SQLite always answers these with an integer
        raise StoreError(f"PRAGMA {name} returned {value!r}, not an integer (corrupt index?)")
    return value


def _migrate(conn: apsw.Connection, path: Path) -> bool:
    """Bring the schema up to date; True if it changed anything."""
    current = _pragma_int(conn, "user_version")
    if current > schema.SCHEMA_VERSION:
        raise StoreError(f"store index {path} has schema version {current}, newer than this "
                         f"jbl understands ({schema.SCHEMA_VERSION}); upgrade jbl")
    if current == schema.SCHEMA_VERSION:
        return False
    # One IMMEDIATE transaction for all steps: a deferred one that reads user_version and then
    # writes fails at once with BUSY when two processes create the same store concurrently.
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = _pragma_int(conn, "user_version")
        for step in range(current, schema.SCHEMA_VERSION):
            conn.execute(schema.MIGRATIONS[step])
        if current == 0:
            conn.execute(f"PRAGMA application_id={schema.APPLICATION_ID}")
            conn.execute("INSERT INTO meta(key, value) VALUES ('chunk_size', ?), "
                         "('created_at', ?)", (str(schema.CHUNK_SIZE), str(time.time())))
        conn.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return True


INDEX_MODE = 0o660  # root/owner and the admin group; no one else may open (and so lock) it


def create_index(path: Path) -> None:
    """Make an empty index file with INDEX_MODE before SQLite opens it (SQLite would create
    it 0644 & ~umask: readable, hence lockable, by everyone). SQLite gives ``-wal`` and
    ``-shm`` the same mode. An existing file is left alone."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     INDEX_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, INDEX_MODE)  # exact, whatever the umask
    finally:
        os.close(fd)


def open_db(store_dir: Path, *, readonly: bool = False, create: bool = False) -> DB:
    path = Path(store_dir) / INDEX_NAME
    if not path.exists() and not create:
        raise StoreError(f"no jbl store at {store_dir} (install a runtime first, or pass --store)")
    if create and not readonly:
        create_index(path)
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
    migrated = False
    if create:
        flags |= apsw.SQLITE_OPEN_CREATE
    try:
        conn = apsw.Connection(os.fspath(path), flags=flags)
        # The store is group-writable: an index.db that is a link (planted) would have root
        # migrate, write and chown files elsewhere. SQLite resolves links once, at open, and
        # uses that name for the file and its -wal/-shm: refuse unless it is the store's own.
        if conn.db_filename("main") != os.path.join(os.path.realpath(store_dir), INDEX_NAME):
            conn.close()
            raise UnsafeStorePath(f"{path} is a symbolic link: jbl never follows links in the "
                                  "store", hint="if it is yours, move the file it points to "
                                  "into its place; else remove it")
        _configure(conn, readonly)
        app = _pragma_int(conn, "application_id")
        if app not in (0, schema.APPLICATION_ID):
            raise StoreError(f"{path} is not a jbl store index (application_id {app:#x})")
        if readonly:
            v = _pragma_int(conn, "user_version")
            if v == 0:  # made (create_index) but not yet migrated: a reader cannot do that
                raise StoreError(f"no jbl store at {store_dir} yet: its index is still being "
                                 "created (or the install that began it was interrupted)",
                                 hint="try again in a moment; any install completes it")
            if v > schema.SCHEMA_VERSION:
                raise StoreError(f"store index {path} has schema version {v}, newer than this "
                                 f"jbl understands ({schema.SCHEMA_VERSION}); upgrade jbl")
        else:
            migrated = _migrate(conn, path)
    except apsw.CantOpenError:
        wal = path.with_name(path.name + "-wal")
        if readonly and not wal.exists() and not os.access(path.parent, os.W_OK):
            # A non-admin reader cannot create the WAL files itself (see _configure).
            raise StoreError(f"cannot read store index {path}: its {wal.name} file is missing "
                             "and you may not create it", hint="an admin can restore it by "
                             "running any jbl store command on it, e.g. jbl setup --system"
                             ) from None
        raise StoreError(f"cannot open store index {path} "
                         f"({'read-only' if readonly else 'read-write'})") from None
    except apsw.NotADBError:
        raise StoreError(f"{path} is not a SQLite database (corrupt store index?)") from None
    except apsw.BusyError:  # past the busy timeout (or _switch_to_wal's)
        raise _busy(path) from None
    db = DB(conn, path)
    db.changed = migrated  # a new store: publish its (empty) summary
    return db
