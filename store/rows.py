"""The one writer of index rows: blobs, contents + chunks, a version with its tree, a
version hidden (``mark_removed``) or its rows removed (``drop_version_rows``), and a blob
file's new encoding (``reencode_blobs``: repair, the cold pass).

Ingest, gc, the test fixtures and the gc benchmark all write rows through these functions,
so the column lists (schema.py says what each column means) are spelled out exactly once.
Every function runs inside the caller's ``db.write()`` transaction and never opens its own:
the caller decides what commits together (an install commits all of its rows at once; the
write order that makes that durable is in ingest.py and blobs.py). Ids are chosen by the
caller (``next_id``) so that it can link rows before inserting them; nothing is deleted while
an install holds the install lock, so ``max(id) + 1`` inside the transaction is free.

Thread-safety: none of its own; use the caller's connection from the caller's thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .db import DB

__all__ = ["BlobRow", "ContentRow", "ChunkRow", "EntryRow", "VersionRow", "next_id",
           "insert_blobs", "insert_contents", "insert_version_tree", "mark_removed",
           "drop_version_rows", "reencode_blobs"]

# Tables whose ids a writer hands out itself (a literal: the name goes into SQL text).
IdTable = Literal["blobs", "contents", "versions", "entries"]


class BlobRow(NamedTuple):
    id: int
    digest: bytes       # sha256 of the decoded bytes
    size: int           # decoded bytes
    stored_size: int    # bytes of the file on disk
    codec: int          # blobs.CODEC_*
    created_at: float


class ContentRow(NamedTuple):
    id: int
    digest: bytes       # sha256 of the whole body
    size: int
    nchunks: int


class ChunkRow(NamedTuple):
    content_id: int
    seq: int
    blob_id: int


class EntryRow(NamedTuple):
    """One ``entries`` row without its ``version_id`` (``insert_version_tree`` adds it)."""
    id: int
    parent_id: int | None   # None only for the version's root directory
    name: bytes
    kind: int               # stat.S_IFDIR | S_IFREG | S_IFLNK
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    content_id: int | None = None
    target: bytes | None = None
    link_id: int | None = None
    nlink: int = 1


@dataclass(frozen=True)
class VersionRow:
    name: str
    version: str
    manifest: str
    installed_at: float
    description: str = ""
    source: str = ""
    checksum: str = ""
    file_count: int = 0
    logical_size: int = 0
    last_used_at: float | None = None
    pinned: bool = False
    id: int | None = None   # None: SQLite picks the next rowid


def next_id(db: DB, table: IdTable) -> int:
    """The first id above every row of ``table`` (inside the caller's write transaction)."""
    return int(db.scalar(f"SELECT coalesce(max(id), 0) + 1 FROM {table}"))


def insert_blobs(db: DB, rows: Iterable[BlobRow]) -> None:
    db.executemany("INSERT INTO blobs(id, digest, size, stored_size, codec, created_at) "
                   "VALUES (?, ?, ?, ?, ?, ?)", rows)


def insert_contents(db: DB, contents: Iterable[ContentRow], chunks: Iterable[ChunkRow]) -> None:
    """File bodies and their chunk lists (every content's chunks in the same call)."""
    db.executemany("INSERT INTO contents(id, digest, size, nchunks) VALUES (?, ?, ?, ?)",
                   contents)
    db.executemany("INSERT INTO chunks(content_id, seq, blob_id) VALUES (?, ?, ?)", chunks)


def insert_version_tree(db: DB, version: VersionRow, entries: Sequence[EntryRow]) -> int:
    """An installed version and its whole tree; returns the version id.

    ``entries`` holds exactly one root (``parent_id`` None): it becomes ``versions.root_id``.
    """
    roots = [e.id for e in entries if e.parent_id is None]
    if len(roots) != 1:
        raise ValueError(f"a version tree needs one root entry, got {len(roots)}")
    v = version
    db.execute("INSERT INTO versions(id, name, version, description, manifest, root_id, state, "
               "source, checksum, file_count, logical_size, installed_at, last_used_at, pinned) "
               "VALUES (?, ?, ?, ?, ?, ?, 'installed', ?, ?, ?, ?, ?, ?, ?)",
               (v.id, v.name, v.version, v.description, v.manifest, roots[0], v.source,
                v.checksum, v.file_count, v.logical_size, v.installed_at, v.last_used_at,
                int(v.pinned)))
    version_id = int(db.conn.last_insert_rowid())
    db.executemany("INSERT INTO entries(id, version_id, parent_id, name, kind, mode, uid, gid, "
                   "mtime_ns, size, content_id, target, link_id, nlink) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   ((e[0], version_id, *e[1:]) for e in entries))
    return version_id


def mark_removed(db: DB, version_id: int, now: float) -> None:
    """Hide a version a live job or mount still uses; gc drops its rows once it is free."""
    db.execute("UPDATE versions SET state='removed', removed_at=? WHERE id=?",
               (now, version_id))


def drop_version_rows(db: DB, version_id: int) -> None:
    """A version's tree, its leases and its row. Its contents, chunks and blobs stay: they
    may be shared, and gc's sweep takes whatever nothing references any more."""
    db.execute("DELETE FROM entries WHERE version_id=?", (version_id,))
    db.execute("DELETE FROM leases WHERE version_id=?", (version_id,))
    db.execute("DELETE FROM versions WHERE id=?", (version_id,))


def reencode_blobs(db: DB, blobs: Iterable[tuple[bytes, int, int]]) -> int:
    """Blob files replaced by another encoding of the same bytes (repair, the cold pass):
    each ``(digest, codec, stored_size)``. Every version's ``stored_size`` (a cache of its
    blobs' stored bytes) is reset to NULL when a size changed. Returns the rows changed."""
    changed = 0
    for digest, codec, stored_size in blobs:
        row = db.one("SELECT codec, stored_size FROM blobs WHERE digest=?", (digest,))
        if row is None or (int(row[0]), int(row[1])) == (codec, stored_size):
            continue
        db.execute("UPDATE blobs SET codec=?, stored_size=? WHERE digest=?",
                   (codec, stored_size, digest))
        changed += 1
        if int(row[1]) != stored_size:
            db.execute("UPDATE versions SET stored_size=NULL WHERE stored_size IS NOT NULL")
    return changed
