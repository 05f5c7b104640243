"""The read-only view of a store: what is installed, each version's tree, and file bytes.

FUSE-free and synchronous. ``fusefs`` adapts it to the kernel; anything else that wants to
browse a store (tests, ``jbl store info``) can use it directly.

* ``installed()`` — every installed version as ``{name: {version: VersionRoot}}``, plus
  ``changed()`` (``PRAGMA data_version``: did another connection commit since last time?).
* ``entry(id)``, ``lookup(parent_id, name)``, ``readdir(dir_id, after_id, limit)`` — rows of
  ``entries`` (indexed: ``entries_by_parent`` and the primary key), in id order, which is the
  stable readdir order (schema invariant).
* ``chunks(content_id)`` — a body's chunk list (blob digest, codec, sizes). Immutable, so a
  caller may keep it for as long as it likes (the mount keeps it for open files, so a version
  removed while a file is open keeps reading once its rows are gone, as long as the blobs are
  protected by a lease).
* ``read(refs, size, offset, length)`` — any byte range: only the chunks it touches, raw
  chunks by ``pread`` of just the range, zstd chunks decompressed once into an LRU cache.
  For an event loop: ``plan_read`` + ``read_piece_nowait`` (never blocks on the disk: page
  cache only, via ``preadv(RWF_NOWAIT)``, and decompresses inline only small chunks) and
  ``read_piece`` (may block; run it in a worker thread); ``warm(ref)`` (blocking) readies a
  chunk ahead of its read (the raw engine's read-ahead at LOOKUP).

``spent_ns`` adds up the nanoseconds spent reading blob files, decompressing and hashing
(from every thread; the mount logs it on ``kill -USR1``), so a slow read can be attributed.

A missing or corrupt blob raises ``IntegrityError`` whose message names the blob digest, and
every byte served has been sha256-checked against its blob's name: a zstd chunk once per
decode; a raw chunk read whole is checked as read; for a partial range of a raw chunk the
whole chunk is read once, checked and kept in the LRU like a decompressed one (a sequential
read reads each chunk once either way; the cost is one hash per MiB). Blob files are opened
only through ``BlobStore.open_blob``: regular files inside the store, never through a link
(the store is group-writable and the mount daemon runs as root), so a planted link plus
index rows gives ``IntegrityError`` (EIO, logged), never a host file's bytes.

Thread-safety: the SQLite part (everything taking ids) uses the Store's one connection and
belongs to ONE thread (the mount's trio thread). ``read_piece``/``read_piece_nowait``/``read``
touch only blob files and the ``ChunkCache`` (which has its own lock): safe from any thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from .blobs import CODEC_RAW, BlobStore
from .errors import IntegrityError
from .store import Store

# Decompressed chunks kept. `import numpy, pandas` decodes ~75 MB: with 64 MiB every chunk was
# evicted before its next use (LRU under a scan bigger than itself), so an import after memory
# pressure decoded everything again; 256 MiB holds a few such working sets. The daemon's
# memory grows to this only as chunks are read (docs/benchmarks.md, "View speed").
CACHE_BYTES = 256 << 20
# Decompressing up to this many decoded bytes inline costs tens of microseconds: cheaper
# than a hop to a worker thread. Bigger chunks go to a thread so the loop keeps serving.
INLINE_DECODE_MAX = 256 << 10

_ENTRY_COLS = ("id, version_id, parent_id, name, kind, mode, uid, gid, mtime_ns, size, "
               "content_id, target, link_id, nlink")


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of ``entries`` (see schema.py for the meaning of each column)."""

    id: int
    version_id: int
    parent_id: int | None
    name: bytes
    kind: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    content_id: int | None
    target: bytes | None
    link_id: int | None
    nlink: int


@dataclass(frozen=True, slots=True)
class VersionRoot:
    version_id: int
    root_id: int
    installed_at: float


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where chunk ``seq`` of a body lives: blob ``digest`` (``size`` decoded bytes)."""

    digest: bytes
    codec: int
    size: int
    stored_size: int


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes ``[start, end)`` of chunk ``ref`` (offsets within the decoded chunk)."""

    ref: ChunkRef
    start: int
    end: int


def _whole_raw(p: Piece) -> bool:
    """A raw chunk read from its first to its last byte (checked as read, never cached)."""
    return p.ref.codec == CODEC_RAW and p.start == 0 and p.end == p.ref.size


def _entry(row: tuple[object, ...]) -> Entry:
    e = Entry(*row)  # type: ignore[arg-type]
    if not isinstance(e.name, bytes):  # tolerate a TEXT name written by an older ingest
        object.__setattr__(e, "name", str(e.name).encode())
    return e


class ChunkCache:
    """LRU of decoded zstd chunks by blob digest, bounded by bytes. Thread-safe."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._d: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: bytes) -> bytes | None:
        with self._lock:
            data = self._d.get(digest)
            if data is None:
                self.misses += 1
                return None
            self._d.move_to_end(digest)
            self.hits += 1
            return data

    def peek(self, digest: bytes) -> bool:
        """Is ``digest`` cached? (no hit or miss counted, no reordering)"""
        with self._lock:
            return digest in self._d

    def put(self, digest: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if digest in self._d:
                self._d.move_to_end(digest)
                return
            self._d[digest] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, old = self._d.popitem(last=False)
                self.bytes -= len(old)


class View:
    def __init__(self, store: Store, cache_bytes: int = CACHE_BYTES) -> None:
        self.store = store
        self.db = store.db
        self.blobs: BlobStore = store.blobs
        self.chunk_size = store.chunk_size
        self.cache = ChunkCache(cache_bytes)
        self._data_version: int | None = None
        self._nowait_ok = True  # False once the blob filesystem refuses RWF_NOWAIT
        # nanoseconds spent reading blob files ("pread"), decompressing ("decode") and
        # hashing ("hash"), from any thread: the daemon's share of a read (`kill -USR1`)
        self.spent_ns = {"pread": 0, "decode": 0, "hash": 0}
        self._spent_lock = threading.Lock()

    def _spent(self, what: str, t0: int) -> None:
        ns = time.perf_counter_ns() - t0
        with self._spent_lock:
            self.spent_ns[what] += ns

    # --- what is installed --------------------------------------------------------------
    def changed(self) -> bool:
        """True if another connection committed since the last call (cheap: no I/O)."""
        v = int(self.db.scalar("PRAGMA data_version"))
        changed = v != self._data_version
        self._data_version = v
        return changed

    def installed(self) -> dict[str, dict[str, VersionRoot]]:
        out: dict[str, dict[str, VersionRoot]] = {}
        for vid, name, version, root_id, at in self.db.iter(
                "SELECT id, name, version, root_id, installed_at FROM versions "
                "WHERE state='installed' AND root_id IS NOT NULL"):
            out.setdefault(name, {})[version] = VersionRoot(vid, root_id, at)
        return out

    def totals(self) -> tuple[int, int]:
        """(logical bytes, files) of everything installed, for statfs."""
        row = self.db.one("SELECT coalesce(sum(logical_size), 0), coalesce(sum(file_count), 0) "
                          "FROM versions WHERE state='installed'")
        assert row is not None
        return int(row[0]), int(row[1])

    # --- the tree -----------------------------------------------------------------------
    def entry(self, entry_id: int) -> Entry | None:
        row = self.db.one(f"SELECT {_ENTRY_COLS} FROM entries WHERE id=?", (entry_id,))
        return _entry(row) if row else None

    def lookup(self, parent_id: int, name: bytes) -> Entry | None:
        row = self.db.one(f"SELECT {_ENTRY_COLS} FROM entries WHERE parent_id=? AND name=?",
                          (parent_id, name))
        return _entry(row) if row else None

    def readdir(self, dir_id: int, after_id: int = 0, limit: int = -1) -> list[Entry]:
        """Children of ``dir_id`` with id > ``after_id``, in id order (``limit`` -1 = all)."""
        return [_entry(r) for r in self.db.iter(
            f"SELECT {_ENTRY_COLS} FROM entries WHERE parent_id=? AND id>? ORDER BY id LIMIT ?",
            (dir_id, after_id, limit))]

    def resolve(self, root_id: int, path: str) -> Entry | None:
        """The entry at relative ``path`` below ``root_id`` (no symlinks followed)."""
        e = self.entry(root_id)
        for part in (p for p in path.split("/") if p not in ("", ".")):
            if e is None:
                return None
            e = self.lookup(e.id, part.encode())
        return e

    @staticmethod
    def readlink(e: Entry) -> bytes:
        return e.target or b""

    def chunks(self, content_id: int) -> tuple[ChunkRef, ...]:
        return tuple(ChunkRef(bytes(d), c, s, ss) for d, c, s, ss in self.db.iter(
            "SELECT b.digest, b.codec, b.size, b.stored_size FROM chunks c "
            "JOIN blobs b ON b.id = c.blob_id WHERE c.content_id=? ORDER BY c.seq",
            (content_id,)))

    # --- bytes --------------------------------------------------------------------------
    def plan_read(self, refs: tuple[ChunkRef, ...], file_size: int, offset: int,
                  length: int) -> list[Piece]:
        """The chunk pieces covering ``[offset, offset+length)`` clipped to the file."""
        end = min(file_size, offset + length)
        if offset >= end:
            return []
        cs = self.chunk_size
        pieces = []
        for seq in range(offset // cs, (end - 1) // cs + 1):
            base = seq * cs
            pieces.append(Piece(refs[seq], max(offset, base) - base, min(end, base + cs) - base))
        return pieces

    def read(self, refs: tuple[ChunkRef, ...], file_size: int, offset: int,
             length: int) -> bytes:
        """Blocking read of any range (for synchronous callers and tests)."""
        return b"".join(self.read_piece(p) for p in self.plan_read(refs, file_size, offset,
                                                                     length))

    def read_piece(self, p: Piece) -> bytes:
        """Blocking: may read the disk and decompress a whole chunk. Thread-safe."""
        if _whole_raw(p):
            return self._checked(p.ref, self._pread(p.ref, 0, p.ref.size, nowait=False) or b"")
        data = self.cache.get(p.ref.digest)
        if data is None:
            stored = self._pread(p.ref, 0, p.ref.stored_size, nowait=False) or b""
            data = self._decode(p.ref, stored)
        return data[p.start:p.end]

    def warm(self, ref: ChunkRef) -> None:
        """Blocking, any thread: have chunk ``ref`` ready for a read to come: a zstd chunk
        decoded and checked into the cache, a raw one read (and checked) into the kernel's
        page cache, so the read is answered without waiting. Raises what that read would."""
        if ref.codec == CODEC_RAW:
            self.read_piece(Piece(ref, 0, ref.size))
        elif self.cache.get(ref.digest) is None:
            self.read_piece(Piece(ref, 0, 0))

    def read_piece_nowait(self, p: Piece) -> bytes | None:
        """The piece if it can be had without waiting for the disk or a big decompression,
        else None (then call ``read_piece`` in a worker thread)."""
        if _whole_raw(p):
            if p.ref.size > INLINE_DECODE_MAX:
                return None  # hashing a big chunk: a worker thread's job
            data = self._pread(p.ref, 0, p.ref.size, nowait=True)
            return None if data is None else self._checked(p.ref, data)
        data = self.cache.get(p.ref.digest)
        if data is not None:
            return data[p.start:p.end]
        if p.ref.size > INLINE_DECODE_MAX:
            return None
        stored = self._pread(p.ref, 0, p.ref.stored_size, nowait=True)
        if stored is None:
            return None
        return self._decode(p.ref, stored)[p.start:p.end]

    def _check(self, ref: ChunkRef, data: bytes) -> None:
        t0 = time.perf_counter_ns()
        ok = hashlib.sha256(data).digest() == ref.digest
        self._spent("hash", t0)
        if not ok:
            raise IntegrityError(f"blob {ref.digest.hex()} is corrupt (its bytes do not hash "
                                 "to its name; run `jbl store verify`)")

    def _checked(self, ref: ChunkRef, data: bytes) -> bytes:
        # A raw chunk read whole: checked as read, not cached (the kernel's page cache keeps
        # a small file's pages; ours would only hold a second copy).
        self._check(ref, data)
        return data

    def _decode(self, ref: ChunkRef, stored: bytes) -> bytes:
        if len(stored) != ref.stored_size:
            raise IntegrityError(f"blob {ref.digest.hex()}: {len(stored)} bytes on disk, "
                                 f"index says {ref.stored_size}")
        t0 = time.perf_counter_ns()
        data = self.blobs.decode(stored, ref.codec, ref.size, f"blob {ref.digest.hex()}")
        self._spent("decode", t0)
        self._check(ref, data)  # once per decode; the cache then serves verified bytes
        self.cache.put(ref.digest, data)
        return data

    def _pread(self, ref: ChunkRef, offset: int, length: int, *, nowait: bool) -> bytes | None:
        """``length`` bytes at ``offset`` of the blob file; None if ``nowait`` and the bytes
        are not all in the page cache (RWF_NOWAIT said EAGAIN or returned short)."""
        if nowait and not self._nowait_ok:
            return None
        t0 = time.perf_counter_ns()
        try:
            return self._pread_blob(ref, offset, length, nowait=nowait)
        finally:
            self._spent("pread", t0)

    def _pread_blob(self, ref: ChunkRef, offset: int, length: int, *, nowait: bool
                    ) -> bytes | None:
        try:
            fd = self.blobs.open_blob(ref.digest)  # a regular file in the store, or an error
        except FileNotFoundError:
            raise IntegrityError(f"blob {ref.digest.hex()} is missing from the store "
                                 "(run `jbl store verify`)") from None
        try:
            if nowait:
                buf = bytearray(length)
                try:
                    n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
                except BlockingIOError:
                    return None
                except OSError as e:
                    if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        self._nowait_ok = False
                        return None
                    raise
                if n != length and offset + n < ref.stored_size:
                    return None  # partly cached: let a thread wait for the rest
                data = bytes(buf[:n])
            else:
                data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise IntegrityError(f"blob {ref.digest.hex()} is truncated "
                                 f"(wanted bytes {offset}..{offset + length})")
        return data
