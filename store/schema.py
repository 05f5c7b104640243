"""The index schema: every table, what each column means, and the migrations. One place.

The index (``STORE/index.db``, SQLite in WAL mode through apsw) describes what is installed;
the blobs under ``STORE/blobs/`` hold the bytes. Invariants, relied on by the view, gc and
verify (``verify`` checks each one):

* A ``versions`` row exists only for a fully ingested version: ingest writes all its blobs
  first (fsync'd), then inserts blobs/contents/chunks/entries/version rows in ONE transaction.
* Every ``blobs`` row has a file ``blobs/<hex[:2]>/<hex[2:]>`` of ``stored_size`` bytes whose
  decoded bytes hash to ``digest``. Files without a row are orphans (a killed install, a gc
  killed between commit and unlink) and are swept by gc after the grace period.
* A file body (``contents``) is the concatenation of its ``chunks`` in ``seq`` order; every
  chunk but the last is exactly ``meta.chunk_size`` bytes, so byte offset -> chunk is arithmetic.
* ``entries`` form one tree per version rooted at ``versions.root_id``; ``(parent_id, name)``
  is unique. Entry ids only grow, so ``id`` order is a stable readdir order.
* Nothing counts references: gc marks from the roots (versions + live leases) each time.

Migrations: ``MIGRATIONS[i]`` takes ``user_version`` i -> i+1, all in one transaction. A
database whose ``user_version`` is newer than ``SCHEMA_VERSION`` is refused (StoreError).
"""

from __future__ import annotations

APPLICATION_ID = 0x6A626C31  # "jbl1": `file` and other tools can tell our index from others

CHUNK_SIZE = 1 << 20  # bytes per chunk of a large file; recorded in meta at creation

_V1 = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL                -- 'chunk_size', 'created_at', 'store_id'
);

CREATE TABLE blobs (                   -- one file on disk: a compressed or raw chunk
    id          INTEGER PRIMARY KEY,
    digest      BLOB NOT NULL UNIQUE,  -- sha256 of the DECODED bytes (32 raw bytes)
    size        INTEGER NOT NULL,      -- decoded bytes
    stored_size INTEGER NOT NULL,      -- bytes of the file on disk
    codec       INTEGER NOT NULL,      -- 0 = raw, 1 = zstd frame, 2 = zstd frame the cold
                                       -- pass settled (store/recompress.py; see blobs.CODEC_*)
    created_at  REAL NOT NULL          -- unix time the row was committed
);

CREATE TABLE contents (                -- a regular file's body, shared by every entry with it
    id      INTEGER PRIMARY KEY,
    digest  BLOB NOT NULL UNIQUE,      -- sha256 of the whole body (file-level dedup key)
    size    INTEGER NOT NULL,          -- body bytes
    nchunks INTEGER NOT NULL           -- ceil(size / chunk_size); 0 for an empty file
);

CREATE TABLE chunks (                  -- contents -> blobs, in order
    content_id INTEGER NOT NULL REFERENCES contents(id),
    seq        INTEGER NOT NULL,       -- 0-based; covers bytes [seq*chunk_size, +chunk_size)
    blob_id    INTEGER NOT NULL REFERENCES blobs(id),
    PRIMARY KEY (content_id, seq)
) WITHOUT ROWID;
CREATE INDEX chunks_by_blob ON chunks(blob_id);

CREATE TABLE versions (                -- one installed runtime version
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,        -- as published (semver text)
    description  TEXT NOT NULL DEFAULT '',
    manifest     TEXT NOT NULL,        -- runtime.yml verbatim
    root_id      INTEGER,              -- entries.id of the runtime directory (runtime.yml's dir)
    state        TEXT NOT NULL DEFAULT 'installed',
                                       -- 'installed' | 'removed' (hidden; kept while in use)
    source       TEXT NOT NULL DEFAULT '',  -- registry URL or tarball path it came from
    checksum     TEXT NOT NULL DEFAULT '',  -- 'sha256:<hex>' of the tarball
    file_count   INTEGER NOT NULL DEFAULT 0,
    logical_size INTEGER NOT NULL DEFAULT 0, -- sum of regular file sizes (extracted bytes)
    installed_at REAL NOT NULL,
    last_used_at REAL,                 -- last job/mount use (coarse: updated per lease)
    removed_at   REAL,
    pinned       INTEGER NOT NULL DEFAULT 0, -- 1 = never collected by gc policies
    stored_size  INTEGER,              -- cache: stored bytes of the distinct blobs it references;
                                       -- NULL = not computed yet (report.py fills it). A
                                       -- version's entries are immutable; blobs only shrink
                                       -- (the cold pass), which resets it to NULL
    UNIQUE (name, version)
);

CREATE TABLE entries (                 -- the tree of every version
    id        INTEGER PRIMARY KEY,
    version_id INTEGER NOT NULL REFERENCES versions(id),
    parent_id INTEGER,                 -- NULL only for a version's root directory
    name      BLOB NOT NULL,           -- one path component, UTF-8 bytes ('' for the root)
    kind      INTEGER NOT NULL,        -- stat.S_IFDIR | S_IFREG | S_IFLNK
    mode      INTEGER NOT NULL,        -- permission bits (setuid/setgid already cleared)
    uid       INTEGER NOT NULL,
    gid       INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,        -- never normalised (Python checks .pyc against it)
    size      INTEGER NOT NULL,        -- file bytes; symlink target bytes; 0 for dirs
    content_id INTEGER REFERENCES contents(id), -- regular files only
    target    BLOB,                    -- symlink target, verbatim bytes
    link_id   INTEGER,                 -- hardlink: id of the first entry of its link group
    nlink     INTEGER NOT NULL DEFAULT 1 -- links in this version (dirs: 2 + subdirs)
);
CREATE UNIQUE INDEX entries_by_parent ON entries(parent_id, name);
CREATE INDEX entries_by_version ON entries(version_id);
CREATE INDEX entries_by_content ON entries(content_id) WHERE content_id IS NOT NULL;

CREATE TABLE leases (                  -- live users of a version: gc roots
    id         INTEGER PRIMARY KEY,
    version_id INTEGER NOT NULL,
    kind       TEXT NOT NULL,          -- 'job' | 'mount' | 'install'
    pid        INTEGER NOT NULL,       -- holder; a lease whose pid is gone is dead
    pid_start  INTEGER NOT NULL,       -- /proc/PID/stat starttime, guards against pid reuse
    created_at REAL NOT NULL
);
CREATE INDEX leases_by_version ON leases(version_id);
"""

# v2: who a mount saw using a version it holds, so `store df`/`gc` can name whoever keeps a
# removed version alive (fusefs/leases.py). NULL for other leases: the holder is ``pid``.
_V2 = """
ALTER TABLE leases ADD COLUMN holder_uid INTEGER;  -- last requester's uid (FUSE header)
ALTER TABLE leases ADD COLUMN holder_pid INTEGER;  -- last requester's pid (FUSE header)
"""

# MIGRATIONS[i] upgrades user_version i -> i + 1.
MIGRATIONS: list[str] = [_V1, _V2]
SCHEMA_VERSION = len(MIGRATIONS)
